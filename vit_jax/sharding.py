"""Device mesh and partition rules on logical axes.

Every parameter and activation dimension is named once, in the model, with a
logical name ('embed', 'mlp', 'heads', 'batch', ...). A strategy is a table
mapping those names to mesh axes; every NamedSharding is derived from
`jax.eval_shape` of the state through that table, so nothing else in the code
mentions mesh axes.

  dp    batch over 'data'; parameters and optimizer state replicated.
  fsdp  batch over 'data'; parameters and optimizer state sharded over 'data'
        along their embedding (or conv output) dimension.
  tp    batch over 'data'; attention heads and MLP hidden units over 'model'
        (Megatron: column- then row-parallel), everything else replicated.

A dimension that its mesh axis does not divide stays replicated, so one rule
table serves every model size.
"""

import contextlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = 'data'
MODEL = 'model'
MESH_AXES = (DATA, MODEL)

RULES: dict[str, tuple[tuple[str, str], ...]] = {
  'dp': (('batch', DATA),),
  'fsdp': (('batch', DATA), ('embed', DATA), ('conv_out', DATA)),
  'tp': (
    ('batch', DATA),
    ('heads', MODEL),
    ('mlp', MODEL),
    ('act_heads', MODEL),
    ('act_mlp', MODEL),
  ),
}


def rules_for(strategy: str) -> tuple[tuple[str, str], ...]:
  """The logical-axis rule table of a strategy ('dp', 'fsdp' or 'tp')."""
  if strategy not in RULES:
    raise ValueError(
      f'Unknown sharding strategy {strategy!r}; use one of {sorted(RULES)}.'
    )
  return RULES[strategy]


def mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
  """Resolves a (data, model) mesh shape where -1 fills the rest."""
  if data == -1 and model == -1:
    raise ValueError('At most one of mesh.data and mesh.model may be -1.')
  if data == -1:
    if num_devices % model:
      raise ValueError(
        f'mesh.model={model} does not divide the {num_devices} devices; pick '
        f'a divisor of {num_devices}.'
      )
    data = num_devices // model
  elif model == -1:
    if num_devices % data:
      raise ValueError(
        f'mesh.data={data} does not divide the {num_devices} devices; pick '
        f'a divisor of {num_devices}.'
      )
    model = num_devices // data
  if data * model != num_devices:
    raise ValueError(
      f'A mesh of data={data} x model={model} needs {data * model} devices, '
      f'but {num_devices} are available; set --config.mesh.data and '
      '--config.mesh.model so that their product is the device count (or -1 '
      'for one of them).'
    )
  return data, model


def create_mesh(
  data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A ('data', 'model') mesh over all (or the given) devices.

  Devices of one process stay contiguous along 'data', so each process feeds
  a contiguous slice of the global batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, model, len(devices))
  try:
    # Orders TPU devices by the slice's physical topology and GPUs by id;
    # other devices (CPUs) it keeps in the given order.
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    # TPU devices it cannot lay out, each failure with its own exception:
    # a mesh shape that no product of the torus's axes tiles
    # (NotImplementedError), a subset whose coordinates leave a hole, or
    # more than one core per chip (AssertionError); ValueError, which this
    # JAX raises only for layouts this call does not ask for (contiguous
    # submeshes, a device count other than the shape's), stays for other
    # JAX versions within the supported range. The given order, which keeps
    # each process's devices contiguous, is then the mesh.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _named_sharding(
  shape: Sequence[int], logical: P | None, mesh: Mesh, rules: dict[str, str]
) -> NamedSharding:
  names = tuple(logical or ()) + (None,) * (len(shape) - len(logical or ()))
  axes, used = [], set()
  for dim, name in zip(shape, names, strict=True):
    axis = rules.get(name) if name is not None else None
    if axis is None or axis in used or dim % mesh.shape[axis]:
      axes.append(None)
    else:
      axes.append(axis)
      used.add(axis)
  return NamedSharding(mesh, P(*axes))


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def strip_boxes(tree: Any) -> Any:
  """Replaces logical-partitioning boxes by their values.

  Unlike `nn.unbox` this adds no sharding constraint, so it also works on
  abstract values and outside of `jit`.
  """
  return jax.tree.map(
    lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box
  )


def tree_shardings(abstract: Any, mesh: Mesh, strategy: str) -> Any:
  """NamedShardings for a tree of (possibly logically boxed) abstract arrays.

  Args:
    abstract: `jax.eval_shape` of a function returning the state, whose
      parameters carry `nn.LogicallyPartitioned` boxes; unboxed leaves (step
      counters, batch statistics) are replicated.
    mesh: the device mesh.
    strategy: 'dp', 'fsdp' or 'tp'.

  Returns:
    A tree of NamedSharding with the structure of `strip_boxes(abstract)`.
  """
  rules = dict(rules_for(strategy))
  logical = nn.get_partition_spec(abstract)
  shapes = strip_boxes(abstract)
  return jax.tree.map(
    lambda spec, x: _named_sharding(x.shape, spec, mesh, rules),
    logical,
    shapes,
    is_leaf=lambda x: isinstance(x, P),
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split over 'data' and replicated over 'model'."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, strategy: str):
  """Sets the mesh and the strategy's rules while tracing model code.

  Inside it, the models' logical constraints shard the activations; outside
  it they are no-ops.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for(strategy)):
    yield mesh

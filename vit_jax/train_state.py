"""The training state, its shardings, and its sharded creation.

The state's shardings are derived from `jax.eval_shape` of its creation with
logically-partitioned parameters (see vit_jax/sharding.py); the state is then
created by a jitted function whose outputs carry those shardings, so no
device ever holds more than its shard (a ViT-H/14 is never materialised
whole on one device under fsdp or tp).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vit_jax import sharding

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config.

  The dropout RNG and the data position are functions of (seed, step), so
  `step` restores them too.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  batch_stats: PyTree  # {} for models without BatchNorm.
  ema_params: PyTree | None  # Polyak average of params, if enabled.

  def variables(self, ema: bool = False) -> dict[str, PyTree]:
    """Flax variables for `model.apply` (the EMA weights if asked)."""
    params = (
      self.ema_params if ema and self.ema_params is not None else self.params
    )
    if self.batch_stats:
      return {'params': params, 'batch_stats': self.batch_stats}
    return {'params': params}


def new_state(
  variables: PyTree, tx: optax.GradientTransformation, use_ema: bool
) -> TrainState:
  """A fresh state around `variables` (step 0, new optimizer state)."""
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    batch_stats=variables.get('batch_stats', {}),
    ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
  )


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Shapes and shardings of a TrainState."""

  abstract: TrainState  # ShapeDtypeStructs carrying their shardings.
  shardings: TrainState  # NamedShardings.


def state_layout(
  init_variables: Callable[[jax.Array], PyTree],
  tx: optax.GradientTransformation,
  use_ema: bool,
  mesh: Mesh,
  strategy: str,
) -> StateLayout:
  """Derives the state's shardings from logical axis names.

  Args:
    init_variables: rng -> the model's (logically boxed) variables, e.g.
      `lambda rng: model.init(rng, images)`.
    tx: the optimizer; its state follows the parameters' shardings.
    use_ema: whether the state holds an EMA copy of the parameters.
    mesh: the device mesh.
    strategy: 'dp', 'fsdp' or 'tp'.
  """
  boxed = jax.eval_shape(
    lambda rng: new_state(init_variables(rng), tx, use_ema), jax.random.key(0)
  )
  shardings = sharding.tree_shardings(boxed, mesh, strategy)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    sharding.strip_boxes(boxed),
    shardings,
  )
  return StateLayout(abstract=abstract, shardings=shardings)


def create_state(
  init_variables: Callable[[jax.Array], PyTree],
  tx: optax.GradientTransformation,
  use_ema: bool,
  layout: StateLayout,
  rng: jax.Array,
) -> TrainState:
  """Initialises a state directly into its shardings."""
  create = jax.jit(
    lambda rng: sharding.strip_boxes(
      new_state(init_variables(rng), tx, use_ema)
    ),
    out_shardings=layout.shardings,
  )
  return create(rng)


def state_from_variables(
  variables: PyTree,
  tx: optax.GradientTransformation,
  use_ema: bool,
  layout: StateLayout,
) -> TrainState:
  """A fresh state around given host variables (e.g. a loaded checkpoint)."""
  shardings = {'params': layout.shardings.params}
  if 'batch_stats' in variables:
    shardings['batch_stats'] = layout.shardings.batch_stats
  create = jax.jit(
    lambda v: new_state(v, tx, use_ema), out_shardings=layout.shardings
  )
  return create(jax.device_put(variables, shardings))

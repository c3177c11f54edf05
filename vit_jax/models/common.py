"""Pieces shared by every model family: compute dtype, logical axes, remat.

Parameters are always float32. The compute dtype decides the dtype of
activations and of matmul/convolution inputs; with bfloat16 the products are
accumulated in float32 (`preferred_element_type`) and rounded back, which is
both what TPUs do natively and what makes AMX-BF16 CPUs fast (a bfloat16 to
bfloat16 matmul is not).
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.kernels import mkl, onednn

Dtype = Any

COMPUTE_DTYPES = ('float32', 'bfloat16')

# Who runs the dense products: 'xla' (the backend's own), 'mkl' (all of
# them in MKL's GEMM, the custom call of vit_jax/kernels/mkl.py, CPUs
# only), 'onednn' (all of them in oneDNN, vit_jax/kernels/onednn.py),
# 'mixed' (oneDNN but for the forward products of fewer than
# `MIXED_ONEDNN_MIN_ROWS` rows, which stay XLA's) or 'auto' (see
# `resolve_matmul`).
MATMULS = ('auto', 'xla', 'mkl', 'onednn', 'mixed')
# The custom-call implementations and the library (module) each runs on.
_LIBRARY = {'mkl': mkl, 'onednn': onednn, 'mixed': onednn}
# Rows (batch x tokens) from which 'mixed' runs a forward product in oneDNN:
# ViT-B/16 inference, bfloat16, was 5% faster in XLA at 1,576 rows (batch 8,
# 224 px), 6% faster in oneDNN at 3,152 (batch 16), 25-29% at 4,616 (384 px)
# and 6,304 (batch 32).
MIXED_ONEDNN_MIN_ROWS = 2048

# Rematerialisation policies by name; 'none' disables remat altogether.
REMAT_POLICIES = (
  'none',
  'nothing_saveable',
  'dots_saveable',
  'dots_with_no_batch_dims_saveable',
  'everything_saveable',
)


def compute_dtype(name: str | Dtype) -> Dtype:
  """Returns the jnp dtype for a compute-dtype name, checking it."""
  if not isinstance(name, str):
    name = jnp.dtype(name).name
  if name not in COMPUTE_DTYPES:
    raise ValueError(
      f'Unknown compute dtype {name!r}; use one of {COMPUTE_DTYPES}.'
    )
  return jnp.dtype(name)


def custom_call_problem(implementation: str) -> str | None:
  """Why the library of 'mkl', 'onednn' or 'mixed' cannot run here, or None."""
  if jax.default_backend() != 'cpu':
    return f'it runs on CPUs, this is {jax.default_backend()}'
  return _LIBRARY[implementation].problem()


def resolve_matmul(name: str, dtype: str | Dtype) -> tuple[str, str]:
  """The implementation of the dense products for a `matmul` option.

  On a single CPU device 'auto' picks 'mkl' for float32 where MKL's custom
  call runs on an Intel CPU: ViT-B/16 training steps ran 1.20-1.25x faster
  than in XLA:CPU (MKL's sgemm against YNNPACK's, and the backward
  products read an operand transposed in place where XLA copies it
  first), inference 1.13x. On other CPUs MKL is slow (`mkl.unsuited`) and
  float32 takes 'xla'.
  For bfloat16 it picks 'mixed' where oneDNN runs: the backward products
  in oneDNN (about 8% faster than XLA's), and the small forward products
  left to XLA, which fuses them with their bias and rounding; with every
  product in MKL, ViT-Ti/16 inference ran at 0.8x and ViT-B/16 at batch 32
  at 0.92-0.95x of that, at batch 8 the same (docs/performance-cpu.md).
  Without oneDNN bfloat16 takes 'mkl' (on Intel CPUs) or 'xla', without
  MKL float32 takes 'xla'.
  Everywhere else 'auto' is XLA: on GPUs and TPUs, and with several
  devices, whose products XLA partitions itself.

  Args:
    name: one of `MATMULS`.
    dtype: the compute dtype.

  Returns:
    (implementation, why): 'xla', 'mkl', 'onednn' or 'mixed', and the
    reason, for the log.

  Raises:
    ValueError: for an unknown name, or a custom call where it cannot run.
  """
  if name not in MATMULS:
    raise ValueError(f'Unknown matmul {name!r}; use one of {MATMULS}.')
  backend = jax.default_backend()
  if name in _LIBRARY:
    problem = custom_call_problem(name)
    if problem:
      raise ValueError(
        f'matmul={name!r} cannot run here: {problem} Use '
        "matmul='auto' (picks what runs here) or 'xla'."
      )
    return name, 'set explicitly'
  if name == 'xla':
    return 'xla', 'set explicitly'
  if backend != 'cpu':
    return 'xla', f'{backend}, not a CPU'
  if jax.device_count() > 1:
    return 'xla', f'{jax.device_count()} devices'
  dtype = compute_dtype(dtype)
  # (implementation, its library's name), in the order of preference above.
  choices = [('mkl', 'MKL')]
  if dtype == jnp.bfloat16:
    choices.insert(0, ('mixed', 'oneDNN'))
  problems = []
  for implementation, label in choices:
    # Checked first, so that MKL is not built where it would not be picked.
    unsuited = mkl.unsuited() if implementation == 'mkl' else None
    if unsuited:
      problems.append(f'{label} not picked: {unsuited}')
    elif problem := custom_call_problem(implementation):
      problems.append(f'{label} cannot run: {problem}')
    else:
      why = f'{dtype.name} on one CPU device'
      return implementation, '; '.join([why, *problems])
  return 'xla', '; '.join(problems)


def cast_kernels(variables: Any, dtype: str | Dtype) -> Any:
  """`variables` with every matmul/convolution kernel cast to `dtype`, once.

  For inference in bfloat16: the products round their operands to the
  compute dtype on every call, so float32 kernels cost a cast (a read of the
  float32 kernel, a write of its bfloat16 copy) per kernel per forward pass,
  about 0.5 GB of memory traffic for ViT-B/16 on a CPU. Kernels cast
  beforehand make those casts no-ops. Biases, LayerNorm scales and
  embeddings stay as they are (float32), so the results do not change:
  the products see the same bfloat16 kernels either way. Not for training,
  whose updates need the float32 kernels.
  """
  dtype = compute_dtype(dtype)

  def cast(path, leaf):
    name = getattr(path[-1], 'key', None)
    return leaf.astype(dtype) if name == 'kernel' else leaf

  return jax.tree_util.tree_map_with_path(cast, variables)


def _dot_operand_grads(g, lhs, rhs, dimension_numbers):
  """The cotangents of both operands of a dot_general, in float32.

  The two products take `g` in the operands' dtype. Each one puts its
  operand's free dimensions in the operand's own order where it can (lhs
  first for the right-hand side, which makes a weight gradient a
  (D, B*T) x (B*T, M) product with no transpose of its result): XLA:CPU's
  matmul library runs such products in bfloat16, while a transposed result
  may make it fall back to float32.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  f32 = jnp.float32
  num_batch = len(lb)
  lhs_kept = tuple(i for i in range(lhs.ndim) if i not in lc + lb)
  rhs_kept = tuple(i for i in range(rhs.ndim) if i not in rc + rb)
  g_batch = tuple(range(num_batch))
  g_lhs = tuple(range(num_batch, num_batch + len(lhs_kept)))
  g_rhs = tuple(range(num_batch + len(lhs_kept), g.ndim))

  lhs_grad = jax.lax.dot_general(
    g, rhs, ((g_rhs, rhs_kept), (g_batch, rb)), preferred_element_type=f32
  )
  # Axes: batch, lhs kept, then rhs's contracted axes in ascending order.
  lhs_axes = (*lb, *lhs_kept, *(lc[i] for i in np.argsort(rc)))
  lhs_grad = jax.lax.transpose(lhs_grad, tuple(np.argsort(lhs_axes)))

  rhs_grad = jax.lax.dot_general(
    lhs, g, ((lhs_kept, g_lhs), (lb, g_batch)), preferred_element_type=f32
  )
  # Axes: batch, lhs's contracted axes in ascending order, then rhs kept.
  rhs_axes = (*rb, *(rc[i] for i in np.argsort(lc)), *rhs_kept)
  rhs_grad = jax.lax.transpose(rhs_grad, tuple(np.argsort(rhs_axes)))
  return lhs_grad, rhs_grad


def vary_alike(*arrays: jax.Array) -> list[jax.Array]:
  """Makes arrays vary over the same manual mesh axes (inside shard_map).

  jax's own binary ops do this implicitly; a custom_vjp must get operands of
  one type, so that e.g. the gradient of a replicated kernel, computed from
  per-device activations, is summed over devices by the transpose of the
  cast. A no-op outside shard_map.
  """
  varying = [frozenset(jax.typeof(x).mat.varying) for x in arrays]
  union = frozenset().union(*varying)
  return [
    jax.lax.pcast(x, tuple(sorted(union - axes)), to='varying')
    if union - axes
    else x
    for x, axes in zip(arrays, varying, strict=True)
  ]


def mixed_dot_general(
  lhs: jax.Array,
  rhs: jax.Array,
  dimension_numbers,
  dtype: Dtype,
  output_dtype: Dtype,
  matmul: str = 'xla',
) -> jax.Array:
  """`lax.dot_general` on `dtype` operands, accumulated in float32.

  Forward and backward run the same kind of product: operands rounded to
  `dtype` (bfloat16), products accumulated in float32. The output is rounded
  to `output_dtype`; the cotangent coming back is rounded to `dtype` before
  the two backward products, whose results are rounded to each operand's own
  dtype (so a float32 operand, e.g. a kernel passed uncast, gets a float32
  gradient). Without this, the backward products see a float32 cotangent
  and run as float32 x float32 matmuls, several times slower than bfloat16
  ones on AMX and TPUs, for two thirds of a training step's FLOPs.

  Args:
    lhs: left operand, any float dtype.
    rhs: right operand, any float dtype.
    dimension_numbers: as for `lax.dot_general`.
    dtype: the operands' compute dtype.
    output_dtype: the result's dtype.
    matmul: one of `MATMULS`. MKL and oneDNN run only products that are
      matrix products of the reshaped operands (a dense layer's: the left
      operand's trailing axes contracted with the right one's leading axes,
      no batch axes); others stay XLA's.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  dimension_numbers = (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
  lhs, rhs = vary_alike(lhs, rhs)
  implementation, _ = resolve_matmul(matmul, dtype)
  if implementation in _LIBRARY and not _is_matrix_product(
    lhs, rhs, dimension_numbers
  ):
    implementation = 'xla'
  return _mixed_dot(
    lhs,
    rhs,
    dimension_numbers,
    jnp.dtype(dtype),
    jnp.dtype(output_dtype),
    lhs.dtype,
    rhs.dtype,
    implementation,
  )


def _is_matrix_product(lhs, rhs, dimension_numbers) -> bool:
  """Whether the dot_general is (rows, inner) @ (inner, columns), reshaped.

  True when the left operand's trailing axes are contracted, in order, with
  the right operand's leading axes and there are no batch axes: then both
  operands are row-major matrices without a copy.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  return (
    not lb
    and not rb
    and lc == tuple(range(lhs.ndim - len(lc), lhs.ndim))
    and rc == tuple(range(len(rc)))
  )


def _as_matrices(lhs, rhs, num_contracted: int):
  """The operands as (rows, inner) and (inner, columns) matrices."""
  inner = math.prod(rhs.shape[:num_contracted])
  return lhs.reshape(-1, inner), rhs.reshape(inner, -1)


def _product(lhs, rhs, dimension_numbers, implementation):
  """The float32 product of two `dtype` operands (forward pass)."""
  rows = math.prod(lhs.shape[: lhs.ndim - len(dimension_numbers[0][0])])
  if implementation == 'xla' or (
    implementation == 'mixed' and rows < MIXED_ONEDNN_MIN_ROWS
  ):
    return jax.lax.dot_general(
      lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32
    )
  num_contracted = len(dimension_numbers[0][1])
  a, b = _as_matrices(lhs, rhs, num_contracted)
  out_shape = (
    *lhs.shape[: lhs.ndim - num_contracted],
    *rhs.shape[num_contracted:],
  )
  return _LIBRARY[implementation].matmul(a, b).reshape(out_shape)


def _matrix_operand_grads(g, lhs, rhs, num_contracted: int, implementation):
  """`_dot_operand_grads` of a matrix product, run by a custom call.

  Both read an operand transposed in place (the weight gradient, the
  activations), where XLA:CPU copies it first.
  """
  matmul = _LIBRARY[implementation].matmul
  a, b = _as_matrices(lhs, rhs, num_contracted)
  g = g.reshape(a.shape[0], b.shape[1])
  lhs_grad = matmul(g, b, transpose_b=True)
  rhs_grad = matmul(a, g, transpose_a=True)
  return lhs_grad.reshape(lhs.shape), rhs_grad.reshape(rhs.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _mixed_dot(lhs, rhs, *args):
  return _mixed_dot_fwd(lhs, rhs, *args)[0]


def _mixed_dot_fwd(
  lhs,
  rhs,
  dimension_numbers,
  dtype,
  output_dtype,
  lhs_dtype,
  rhs_dtype,
  implementation,
):
  del lhs_dtype, rhs_dtype  # For the backward pass.
  lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
  out = _product(lhs, rhs, dimension_numbers, implementation)
  return out.astype(output_dtype), (lhs, rhs)


def _mixed_dot_bwd(
  dimension_numbers,
  dtype,
  output_dtype,
  lhs_dtype,
  rhs_dtype,
  implementation,
  residuals,
  g,
):
  del output_dtype
  lhs, rhs = residuals
  g = g.astype(dtype)
  if implementation in _LIBRARY:
    lhs_grad, rhs_grad = _matrix_operand_grads(
      g, lhs, rhs, len(dimension_numbers[0][1]), implementation
    )
  else:
    lhs_grad, rhs_grad = _dot_operand_grads(g, lhs, rhs, dimension_numbers)
  return lhs_grad.astype(lhs_dtype), rhs_grad.astype(rhs_dtype)


_mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


def dot_general(
  dtype: Dtype, output_dtype: Dtype | None = None, matmul: str = 'xla'
) -> Callable[..., jax.Array] | None:
  """A dot_general for flax layers that accumulates in float32.

  The result is rounded to `output_dtype` (default: `dtype`), and the
  backward pass runs on `dtype` operands too (see `mixed_dot_general`).
  Returns None (the layer's default) for float32 compute in XLA.
  """
  if (
    jnp.dtype(dtype) == jnp.float32
    and resolve_matmul(matmul, dtype)[0] == 'xla'
  ):
    return None
  output_dtype = dtype if output_dtype is None else output_dtype

  def accumulate_in_float32(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None
  ):
    del precision, preferred_element_type  # Fixed by the compute dtype.
    return mixed_dot_general(
      lhs, rhs, dimension_numbers, dtype, output_dtype, matmul
    )

  return accumulate_in_float32


def conv_general_dilated(dtype: Dtype) -> Callable[..., jax.Array] | None:
  """A conv_general_dilated for flax layers that accumulates in float32."""
  if jnp.dtype(dtype) == jnp.float32:
    return None

  def accumulate_in_float32(lhs, rhs, *args, **kwargs):
    kwargs['preferred_element_type'] = jnp.float32
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs).astype(dtype)

  return accumulate_in_float32


def partitioned(
  init: nn.initializers.Initializer, names: Sequence[str | None]
) -> nn.initializers.Initializer:
  """Attaches logical axis names to a parameter initializer."""
  return nn.with_logical_partitioning(init, tuple(names))


def head(num_classes: int, bias_init: float, **kwargs) -> nn.Dense:
  """The classification head: a zero-initialised Dense named 'head'.

  Zero weights and a constant bias (e.g. -log(classes)) make the first
  predictions the same for every image, as in the paper's code.
  """
  return nn.Dense(
    num_classes,
    kernel_init=partitioned(nn.initializers.zeros, ('embed', 'classes')),
    bias_init=partitioned(nn.initializers.constant(bias_init), ('classes',)),
    name='head',
    **kwargs,
  )


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical axis names.

  A no-op unless the caller set `nn.logical_axis_rules` and a mesh.
  """
  return nn.with_logical_constraint(x, tuple(names))


def remat_policy(name: str):
  """Returns the jax.checkpoint policy for a name (None for 'none')."""
  if name not in REMAT_POLICIES:
    raise ValueError(
      f'Unknown remat policy {name!r}; use one of {REMAT_POLICIES}.'
    )
  if name == 'none':
    return None
  return getattr(jax.checkpoint_policies, name)

"""Additions of biases and embeddings whose gradients XLA:CPU sums fast.

The gradient of a parameter broadcast over the batch (a bias, a position
embedding) is the sum of the output's cotangent over the broadcast axes.
Autodiff left two such sums slow on a CPU in a ViT-B/16 bfloat16 training
step at batch 8:
- The position embedding's, (8, 197, 768) -> (1, 197, 768): YNNPACK sums a
  short leading axis beside a long kept one at about 1 GB/s, 3-5 ms a step;
  adding the batch's halves element-wise took 0.15 ms.
- The patch embedding's bias, added to a bfloat16 output as flax's `nn.Conv`
  adds it: the sum of a bfloat16 cotangent, which XLA:CPU runs as a tree of
  reduce-windows (2 ms), rounded to bfloat16 before it reaches the float32
  bias. Summed in float32 it is one YNNPACK reduction, and exact to float32.
"""

import functools

import jax
import jax.numpy as jnp

from vit_jax.models import common


def halves_batch() -> bool:
  """Whether to sum over the batch by halving it: on one CPU device.

  With several devices the batch is sharded and its halves would move
  between devices; there XLA partitions the plain sum itself.
  """
  return jax.default_backend() == 'cpu' and jax.device_count() == 1


def sum_to_shape(
  g: jax.Array, shape: tuple[int, ...], halve_batch: bool | None = None
) -> jax.Array:
  """Sums `g` in float32 over the axes that `shape` broadcasts to it.

  Args:
    g: the cotangent, of any float dtype.
    shape: `g`'s shape with axes of size 1, or missing at the front (numpy
      broadcasting).
    halve_batch: sum a broadcast leading axis by adding its halves until one
      row is left, then the other axes by `jnp.sum`; default `halves_batch()`.

  Returns:
    The float32 sum, of `shape`.
  """
  if halve_batch is None:
    halve_batch = halves_batch()
  g = g.astype(jnp.float32)
  shape_in_g = (1,) * (g.ndim - len(shape)) + tuple(shape)
  axes = tuple(
    i
    for i, (n, m) in enumerate(zip(shape_in_g, g.shape, strict=True))
    if n == 1 != m
  )
  if halve_batch and axes and axes[0] == 0:
    while g.shape[0] > 1:
      half = (g.shape[0] + 1) // 2
      # An odd count leaves the top half a row longer: pad the bottom one.
      bottom = jnp.pad(
        g[half:], [(0, 2 * half - g.shape[0])] + [(0, 0)] * (g.ndim - 1)
      )
      g = g[:half] + bottom
  return jnp.sum(g, axis=axes, keepdims=True).reshape(shape)


def add(x: jax.Array, y: jax.Array) -> jax.Array:
  """`x + y.astype(x.dtype)`, `y` broadcast to `x`, with a fast gradient.

  The forward pass is exactly that sum. The gradient for `y` is
  `sum_to_shape` of the cotangent, rounded to `y`'s dtype once (autodiff
  of the cast would round the sum to `x`'s dtype first).

  Raises:
    ValueError: where `y` does not broadcast to `x`'s shape.
  """
  try:
    broadcast = jnp.broadcast_shapes(x.shape, y.shape)
  except ValueError:
    broadcast = None
  if broadcast != x.shape:
    raise ValueError(
      f'bias_gradients.add: a {y.shape} array does not broadcast to the '
      f'{x.shape} one it is added to; it must have its shape with axes of '
      'size 1 or missing at the front.'
    )
  x, y = common.vary_alike(x, y)
  return _broadcast_add(y.shape, y.dtype, x, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _broadcast_add(y_shape, y_dtype, x, y):
  del y_shape, y_dtype
  return x + y.astype(x.dtype)


def _broadcast_add_fwd(y_shape, y_dtype, x, y):
  return _broadcast_add(y_shape, y_dtype, x, y), None


def _broadcast_add_bwd(y_shape, y_dtype, residual, g):
  del residual
  return g, sum_to_shape(g, y_shape).astype(y_dtype)


_broadcast_add.defvjp(_broadcast_add_fwd, _broadcast_add_bwd)

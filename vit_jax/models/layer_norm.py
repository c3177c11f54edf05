"""LayerNorm with a closed-form backward pass.

The forward pass is flax's `nn.LayerNorm` (fast variance, statistics in at
least float32), operation for operation, so outputs and checkpoints are the
same. The backward pass is the textbook closed form, with x_hat the
normalised input and g_hat = g * scale:

  d_x = rstd * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat))

where XLA's derivative of the forward pass goes back through the mean and
the mean of squares separately and broadcasts the scale to the activations'
shape for each. The forward pass saves x_hat, and the two row means are
products with the scale vector, so that no broadcast to the activations'
shape is materialised for XLA:CPU's reductions (a ViT-B/16 training step,
batch 32, 1.19x faster than with x and the mean saved; see
docs/performance-cpu.md).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import common


def _statistics_dtype(dtype):
  # As flax: statistics in the layer's dtype, but at least float32.
  return jnp.promote_types(dtype, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, epsilon: float, dtype):
  """LayerNorm over the last axis: (x - mean) * rstd * scale + bias."""
  return _forward(x, scale, bias, epsilon, dtype)[0]


def _forward(x, scale, bias, epsilon, dtype):
  x32 = x.astype(_statistics_dtype(dtype))
  mean = jnp.mean(x32, -1, keepdims=True)
  mean_of_squares = jnp.mean(jnp.square(x32), -1, keepdims=True)
  variance = jnp.maximum(0.0, mean_of_squares - jnp.square(mean))
  rstd = jax.lax.rsqrt(variance + epsilon)
  y = (x - mean) * (rstd * scale) + bias
  # x_hat is saved rather than x and the mean: rebuilt in the backward pass,
  # its broadcasts of the mean and rstd were materialised for XLA:CPU's
  # reductions. A zero-size array carries x's dtype for its gradient.
  x_hat = (x32 - mean) * rstd
  return y.astype(dtype), (x_hat, scale, rstd, jnp.zeros((0,), x.dtype))


def _backward(epsilon, dtype, residuals, g):
  del epsilon, dtype
  x_hat, scale, rstd, x_dtype_carrier = residuals
  features = x_hat.shape[-1]
  g = g.astype(x_hat.dtype)
  batch_axes = tuple(range(x_hat.ndim - 1))
  g_x_hat = g * x_hat
  d_bias = jnp.sum(g, batch_axes)
  d_scale = jnp.sum(g_x_hat, batch_axes)
  # The row means of g_hat = g * scale and of g_hat * x_hat, as products
  # with the scale vector: the same sums, without broadcasting the scale to
  # the activations' shape first.
  # HIGHEST: float32 sums on TPUs too, whose default rounds to bfloat16.
  row_sum = functools.partial(jnp.einsum, '...d,d->...', precision='highest')
  mean_g_hat = row_sum(g, scale)[..., None] / features
  mean_g_hat_x_hat = row_sum(g_x_hat, scale)[..., None] / features
  d_x = rstd * (g * scale - mean_g_hat - x_hat * mean_g_hat_x_hat)
  return (
    d_x.astype(x_dtype_carrier.dtype),
    d_scale.astype(scale.dtype),
    d_bias.astype(scale.dtype),
  )


layer_norm.defvjp(_forward, _backward)


class LayerNorm(nn.Module):
  """`nn.LayerNorm` over the last axis, with `layer_norm`'s backward pass.

  Parameters 'scale' and 'bias' (float32, logical axis 'embed'), as flax's.
  """

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    scale = self.param(
      'scale', common.partitioned(nn.initializers.ones, ('embed',)), features
    )
    bias = self.param(
      'bias', common.partitioned(nn.initializers.zeros, ('embed',)), features
    )
    x, scale, bias = common.vary_alike(x, scale, bias)
    return layer_norm(x, scale, bias, self.epsilon, self.dtype)

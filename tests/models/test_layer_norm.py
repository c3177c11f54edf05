"""The LayerNorm with a closed-form backward pass, against flax's and float64."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import common
from vit_jax.models.layer_norm import LayerNorm

EPS = 1e-6


def flax_layer_norm(dtype):
  """What the model used before: flax's LayerNorm with the same parameters."""
  return nn.LayerNorm(
    epsilon=EPS,
    dtype=dtype,
    scale_init=common.partitioned(nn.initializers.ones, ('embed',)),
    bias_init=common.partitioned(nn.initializers.zeros, ('embed',)),
  )


def inputs(dtype=jnp.float32, shape=(3, 5, 16)):
  rng = np.random.default_rng(0)
  # An offset mean and uneven scale, as residual streams have.
  x = rng.normal(2.0, 3.0, shape) * rng.uniform(0.5, 2.0, shape[-1])
  params = {
    'scale': rng.normal(1.0, 0.5, shape[-1]).astype(np.float32),
    'bias': rng.normal(0.0, 0.5, shape[-1]).astype(np.float32),
  }
  return jnp.asarray(x, dtype), {'params': params}


def test_parameters_are_flaxs_with_their_logical_axes():
  x, _ = inputs()
  ours = LayerNorm(epsilon=EPS).init(jax.random.key(0), x)
  theirs = flax_layer_norm(jnp.float32).init(jax.random.key(0), x)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for name in ('scale', 'bias'):
    assert ours['params'][name].names == ('embed',)
    np.testing.assert_array_equal(
      ours['params'][name].value, theirs['params'][name].value
    )


@pytest.mark.parametrize(
  'input_dtype, dtype',
  [
    (jnp.float32, jnp.float32),
    (jnp.bfloat16, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16),
  ],
)
def test_forward_is_flaxs_bit_for_bit(input_dtype, dtype):
  x, variables = inputs(input_dtype)
  ours = LayerNorm(epsilon=EPS, dtype=dtype).apply(variables, x)
  theirs = flax_layer_norm(dtype).apply(variables, x)
  assert ours.dtype == theirs.dtype == dtype
  np.testing.assert_array_equal(
    np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
  )


def float64_reference_gradients(x, params, g):
  """Gradients of sum(g * LayerNorm(x)), written out in numpy float64.

  With n features, y = x_hat * scale + bias and x_hat = (x - mean) / std:
  dy/dx of a row is (scale / std) (I - 1/n - x_hat x_hat^T / n), applied
  here as the explicit Jacobian of each row (not the closed form under test).
  """
  x, g = np.float64(x), np.float64(g)
  scale = np.float64(params['scale'])
  n = x.shape[-1]
  mean = x.mean(-1, keepdims=True)
  std = np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + EPS)
  x_hat = (x - mean) / std
  jacobian = (
    np.eye(n) - 1.0 / n - x_hat[..., :, None] * x_hat[..., None, :] / n
  ) * (scale[:, None] / std[..., None])  # [..., output feature, input feature]
  d_x = np.einsum('...i,...ij->...j', g, jacobian)
  batch = tuple(range(x.ndim - 1))
  return d_x, (g * x_hat).sum(batch), g.sum(batch)


def test_gradients_match_float64_jacobians_and_flaxs_autodiff():
  x, variables = inputs()
  g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)

  def gradients(module):
    def loss(params, x):
      return jnp.sum(g * module.apply({'params': params}, x))

    d_params, d_x = jax.grad(loss, argnums=(0, 1))(variables['params'], x)
    return d_x, d_params['scale'], d_params['bias']

  ours = gradients(LayerNorm(epsilon=EPS))
  autodiff = gradients(flax_layer_norm(jnp.float32))
  reference = float64_reference_gradients(x, variables['params'], g)
  for name, mine, flaxs, exact in zip(
    ('d_x', 'd_scale', 'd_bias'), ours, autodiff, reference, strict=True
  ):
    assert mine.dtype == jnp.float32, name
    scale = np.abs(exact).max()
    np.testing.assert_allclose(mine, exact, atol=2e-5 * scale, err_msg=name)
    np.testing.assert_allclose(mine, flaxs, atol=2e-5 * scale, err_msg=name)


def test_bfloat16_activations_get_bfloat16_input_gradients():
  x, variables = inputs(jnp.bfloat16)
  g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.bfloat16)
  module = LayerNorm(epsilon=EPS, dtype=jnp.bfloat16)

  def loss(params, x):
    y = module.apply({'params': params}, x)
    return jnp.sum((g * y).astype(jnp.float32))

  d_params, d_x = jax.grad(loss, argnums=(0, 1))(variables['params'], x)
  assert d_x.dtype == jnp.bfloat16
  assert d_params['scale'].dtype == d_params['bias'].dtype == jnp.float32
  reference = float64_reference_gradients(
    np.float32(x), variables['params'], np.float32(g)
  )
  # bfloat16 keeps 8 significant bits: about 0.4% of each value.
  for name, mine, exact in zip(
    ('d_x', 'd_scale', 'd_bias'),
    (d_x, d_params['scale'], d_params['bias']),
    reference,
    strict=True,
  ):
    scale = np.abs(exact).max()
    np.testing.assert_allclose(
      np.float32(mine), exact, atol=1e-2 * scale, err_msg=name
    )

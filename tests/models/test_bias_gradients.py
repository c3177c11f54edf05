"""Broadcast additions whose gradients are summed fast, against float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vit_jax.models import bias_gradients

# (cotangent, broadcast shape): a position embedding's, odd and unit batch
# sizes (the halving pads the bottom half), a bias over (batch, h, w), a
# shape broadcast in a middle axis only, and none broadcast at all.
SHAPES = [
  ((8, 197, 16), (1, 197, 16)),
  ((7, 5, 6), (1, 5, 6)),
  ((5, 3, 4), (1, 3, 4)),
  ((1, 3, 4), (1, 3, 4)),
  ((3, 2, 2, 6), (6,)),
  ((4, 3, 6), (4, 1, 6)),
  ((2, 6), (2, 6)),
]


def float64_sum_to_shape(g, shape):
  """numpy's own reduction, in float64."""
  g = np.asarray(g, np.float64)
  lead = g.ndim - len(shape)
  g = g.sum(axis=tuple(range(lead)))
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
  return g.sum(axis=axes, keepdims=True)


@pytest.mark.parametrize('halve_batch', [True, False])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('g_shape, shape', SHAPES)
def test_sum_to_shape_is_the_float64_sum(g_shape, shape, dtype, halve_batch):
  g = jax.random.normal(jax.random.key(0), g_shape).astype(dtype)
  got = jax.jit(lambda g: bias_gradients.sum_to_shape(g, shape, halve_batch))(g)
  assert got.shape == shape and got.dtype == jnp.float32
  # Summed in float32 even for a bfloat16 cotangent: float32 rounding only.
  np.testing.assert_allclose(
    got, float64_sum_to_shape(g, shape), rtol=1e-6, atol=1e-5
  )


def test_halving_is_what_the_only_cpu_device_does_by_default():
  # The tests run on 8 CPU devices: there the batch is sharded, and the sum
  # is XLA's own.
  assert jax.device_count() > 1
  assert not bias_gradients.halves_batch()


@pytest.mark.parametrize(
  'x_dtype, y_dtype',
  [('float32', 'float32'), ('bfloat16', 'float32'), ('bfloat16', 'bfloat16')],
)
@pytest.mark.parametrize('g_shape, shape', SHAPES)
def test_add_is_the_sum_and_its_gradients_are_float64s(
  g_shape, shape, x_dtype, y_dtype
):
  kx, ky, kw = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, g_shape).astype(x_dtype)
  y = jax.random.normal(ky, shape).astype(y_dtype)
  weights = jax.random.normal(kw, g_shape).astype(x_dtype)

  out = bias_gradients.add(x, y)
  expected = x + y.astype(x_dtype)
  assert out.dtype == expected.dtype
  np.testing.assert_array_equal(out, expected)  # Exactly the same sum.

  def loss(x, y):
    return jnp.sum((bias_gradients.add(x, y) * weights).astype(jnp.float32))

  x_grad, y_grad = jax.jit(jax.grad(loss, (0, 1)))(x, y)
  assert x_grad.dtype == x.dtype and y_grad.dtype == y.dtype
  np.testing.assert_array_equal(x_grad, weights)
  # Summed in float32 and rounded once, to y's dtype.
  expected_y_grad = float64_sum_to_shape(weights, shape)
  tolerance = 1e-5 if y_dtype == 'float32' else 2**-8
  np.testing.assert_allclose(
    np.asarray(y_grad, np.float64),
    expected_y_grad,
    rtol=tolerance,
    atol=tolerance * np.abs(expected_y_grad).max(),
  )


def test_a_replicated_parameter_gets_every_devices_gradient_in_shard_map():
  mesh = Mesh(np.array(jax.devices()), ('data',))
  x = jax.random.normal(jax.random.key(2), (8 * 2, 3, 4))
  y = jax.random.normal(jax.random.key(3), (1, 3, 4))

  def loss(x, y):
    def local(x, y):
      total = jnp.sum(jnp.sin(bias_gradients.add(x, y)))
      return jax.lax.psum(total, 'data')

    return jax.shard_map(
      local, mesh=mesh, in_specs=(P('data'), P()), out_specs=P()
    )(x, y)

  y_grad = jax.jit(jax.grad(loss, 1))(x, y)
  expected = np.cos(np.float64(x) + np.float64(y)).sum(0, keepdims=True)
  np.testing.assert_allclose(y_grad, expected, rtol=1e-5, atol=1e-5)


def test_a_shape_that_does_not_broadcast_is_named():
  with pytest.raises(ValueError, match=r'\(4,\) array does not broadcast'):
    bias_gradients.add(jnp.zeros((2, 3)), jnp.zeros((4,)))
  # Nor may y's broadcast grow x: its gradient would have the wrong shape.
  with pytest.raises(ValueError, match='does not broadcast'):
    bias_gradients.add(jnp.zeros((1, 3)), jnp.zeros((2, 3)))

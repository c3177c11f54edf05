"""The 2-D matrix products of both CPU custom calls (oneDNN's and MKL's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import needs_custom_calls, random_operands
from vit_jax.kernels import mkl, onednn

MATMULS = [
  pytest.param(onednn.matmul, id='onednn', marks=needs_custom_calls('onednn')),
  pytest.param(mkl.matmul, id='mkl', marks=needs_custom_calls('mkl')),
]


@pytest.mark.parametrize('matmul', MATMULS)
@pytest.mark.parametrize('transpose_a', [False, True])
@pytest.mark.parametrize('transpose_b', [False, True])
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('rows, inner, columns', [(37, 300, 19), (1, 64, 5)])
def test_products_match_float64(
  matmul, transpose_a, transpose_b, dtype, rows, inner, columns
):
  a, b = random_operands(
    (inner, rows) if transpose_a else (rows, inner),
    (columns, inner) if transpose_b else (inner, columns),
    dtype,
  )
  out = jax.jit(
    lambda a, b: matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
  )(a, b)
  assert out.shape == (rows, columns) and out.dtype == jnp.float32
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  a64 = a64.T if transpose_a else a64
  b64 = b64.T if transpose_b else b64
  expected = a64 @ b64
  # The operands are exact in float64; what differs is the float32
  # accumulation: at most inner * 2^-24 of sum |a||b| (a worst case).
  bound = inner * 2.0**-24 * (np.abs(a64) @ np.abs(b64))
  assert np.all(np.abs(np.asarray(out, np.float64) - expected) <= bound)


@pytest.mark.parametrize('matmul', MATMULS)
def test_bfloat16_product_is_exact_on_small_integers(matmul):
  # Every product and partial sum is exact in float32, so any library must
  # give the exact result whatever its order.
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.integers(-4, 5, (64, 96)), jnp.bfloat16)
  b = jnp.asarray(rng.integers(-4, 5, (48, 96)), jnp.bfloat16)
  out = jax.jit(lambda a, b: matmul(a, b, transpose_b=True))(a, b)
  exact = np.asarray(a, np.int64) @ np.asarray(b, np.int64).T
  np.testing.assert_array_equal(np.asarray(out), exact)


@pytest.mark.parametrize('matmul', MATMULS)
def test_mismatched_operands_are_clear_errors(matmul):
  a, b = random_operands((4, 5), (6, 3), 'float32')
  with pytest.raises(ValueError, match=r'contracted sizes differ \(5 and 6\)'):
    matmul(a, b)
  with pytest.raises(ValueError, match='two 2-D arrays of one dtype'):
    matmul(a, b.astype(jnp.bfloat16).reshape(6, 3))
  with pytest.raises(ValueError, match='2-D'):
    matmul(a.reshape(2, 2, 5), b)
  with pytest.raises(ValueError, match=r'got float16\(4, 5\)'):
    matmul(a.astype(jnp.float16), b.astype(jnp.float16))


@pytest.mark.parametrize('matmul', MATMULS)
def test_runs_inside_shard_map_on_every_device(matmul):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  spec = jax.sharding.PartitionSpec('data')
  a, b = random_operands((8 * 16, 24), (24, 10), 'bfloat16')

  def per_device(a, b):
    with pytest.raises(ValueError, match='vary over the same mesh axes'):
      matmul(a, b)
    return matmul(a, jax.lax.pcast(b, 'data', to='varying'))

  product = jax.jit(
    jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(spec, jax.sharding.PartitionSpec()),
      out_specs=spec,
    )
  )
  out = product(a, b)
  expected = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-4)

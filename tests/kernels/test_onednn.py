"""The oneDNN custom calls: products, attention, errors and how they are built."""

import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from helpers import needs_custom_calls, random_operands
from vit_jax.kernels import onednn
from vit_jax.models import attention

pytestmark = needs_custom_calls('onednn')


# Every product of attention's forward and backward passes, on
# (batch, length, heads, head_dim) arrays and (batch, heads, q, k) weights.
ATTENTION_SPECS = [
  ('bqhd,bkhd->bhqk', (2, 5, 3, 8), (2, 7, 3, 8)),
  ('bhqk,bkhd->bqhd', (2, 3, 5, 7), (2, 7, 3, 8)),
  ('bhqk,bqhd->bkhd', (2, 3, 5, 7), (2, 5, 3, 8)),
  ('mn,kn->mk', (6, 9), (4, 9)),
  ('km,kn->mn', (9, 6), (9, 4)),
]


@pytest.mark.parametrize('spec, shape_a, shape_b', ATTENTION_SPECS)
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_strided_batched_products_match_float64(spec, shape_a, shape_b, dtype):
  a, b = random_operands(shape_a, shape_b, dtype, seed=1)
  out = jax.jit(lambda a, b: onednn.einsum(spec, a, b))(a, b)
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  expected = np.einsum(spec, a64, b64)
  assert out.shape == expected.shape and out.dtype == jnp.float32
  inputs, result = spec.split('->')
  letters_a, letters_b = inputs.split(',')
  (contracted,) = set(letters_a) & set(letters_b) - set(result)
  inner = shape_a[letters_a.index(contracted)]
  # As for the 2-D products: float32 accumulation of exact operands.
  bound = inner * 2.0**-24 * np.einsum(spec, np.abs(a64), np.abs(b64))
  assert np.all(np.abs(np.asarray(out, np.float64) - expected) <= bound)


@pytest.mark.parametrize(
  'spec, shape_a, shape_b, message',
  [
    ('bqhd,bkhd->bqk', (2, 4, 3, 5), (2, 6, 3, 5), 'not a batched matrix'),
    ('mk,kn->m', (4, 5), (5, 3), 'not a batched matrix product'),
    ('mkk,kn->mn', (4, 2, 2), (2, 3), 'at most once'),
    ('mk,kn,nj->mj', (4, 5), (5, 3), 'does not fit'),
    ('bqhd,bkhd->bhqk', (2, 5, 3, 8), (2, 7, 4, 8), "'h' has sizes 3 and 4"),
  ],
)
def test_einsums_that_are_not_products_are_refused(
  spec, shape_a, shape_b, message
):
  a, b = random_operands(shape_a, shape_b, 'float32')
  with pytest.raises(ValueError, match=message):
    onednn.einsum(spec, a, b)


def test_a_transposed_result_is_written_in_place():
  a, b = random_operands((4, 5), (5, 3), 'float32')
  out = onednn.einsum('mk,kn->nm', a, b)
  expected = (np.asarray(a, np.float64) @ np.asarray(b, np.float64)).T
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_a_view_outside_its_buffer_is_refused_by_the_call():
  # The call checks the views it is given (here a's rows 6 apart in a
  # 4 x 5 buffer), whatever the Python side computed.
  a, b = random_operands((4, 5), (5, 3), 'float32')
  call = jax.ffi.ffi_call(
    onednn.TARGET, jax.ShapeDtypeStruct((4, 3), jnp.float32)
  )
  strides = dict(
    dims=np.array([4, 5, 3], np.int64),
    b_strides=np.array([3, 1], np.int64),
    out_strides=np.array([3, 1], np.int64),
  )
  good = call(a, b, a_strides=np.array([5, 1], np.int64), **strides)
  np.testing.assert_allclose(good, np.asarray(a) @ np.asarray(b), rtol=1e-5)
  with pytest.raises(Exception, match='does not fit its buffer'):
    jax.block_until_ready(
      call(a, b, a_strides=np.array([6, 1], np.int64), **strides)
    )


def test_float16_is_refused_by_the_call():
  # Called directly (not through onednn.matmul, which refuses it first).
  a, b = random_operands((4, 5), (5, 3), 'float16')
  call = jax.ffi.ffi_call(
    onednn.TARGET, jax.ShapeDtypeStruct((4, 3), jnp.float32)
  )
  with pytest.raises(Exception, match='both bfloat16 or both float32'):
    jax.block_until_ready(
      call(
        a,
        b,
        dims=np.array([4, 5, 3], np.int64),
        a_strides=np.array([5, 1], np.int64),
        b_strides=np.array([3, 1], np.int64),
        out_strides=np.array([3, 1], np.int64),
      )
    )


def test_compiled_once_and_kept(tmp_path, monkeypatch):
  monkeypatch.setenv('VIT_JAX_KERNEL_CACHE', str(tmp_path))
  include, library = onednn._find_onednn()
  first = onednn._compile(include, library)
  assert first.parent == tmp_path and first.suffix == '.so'
  modified = first.stat().st_mtime_ns
  assert onednn._compile(include, library) == first
  assert first.stat().st_mtime_ns == modified
  assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_missing_onednn_names_the_install_command(tmp_path, monkeypatch):
  monkeypatch.setattr(onednn, '_prefixes', lambda: [tmp_path])
  with pytest.raises(onednn.Unavailable) as e:
    onednn._find_onednn()
  assert onednn.INSTALL_HINT in str(e.value) and str(tmp_path) in str(e.value)


def test_missing_compiler_is_named(tmp_path, monkeypatch):
  monkeypatch.setenv('CXX', 'no-such-compiler')
  monkeypatch.setenv('VIT_JAX_KERNEL_CACHE', str(tmp_path))
  include, library = onednn._find_onednn()
  with pytest.raises(onednn.Unavailable, match="'no-such-compiler'"):
    onednn._compile(include, library)


def test_compile_errors_are_shown_and_leave_nothing(tmp_path, monkeypatch):
  broken = tmp_path / 'broken.cc'
  broken.write_text('this is not C++;\n')
  cache = tmp_path / 'cache'
  monkeypatch.setattr(onednn, 'SOURCES', (broken,))
  monkeypatch.setenv('VIT_JAX_KERNEL_CACHE', str(cache))
  include, library = onednn._find_onednn()
  with pytest.raises(onednn.Unavailable, match=r'compiling broken\.cc failed'):
    onednn._compile(include, library)
  assert list(cache.iterdir()) == []


def test_sources_ship_beside_the_module():
  for source in onednn.SOURCES:
    assert source.is_file()
    assert pathlib.Path(onednn.__file__).parent == source.parent
  assert os.environ.get('VIT_JAX_KERNEL_CACHE')  # tests keep ~/.cache clean


def attention_inputs(shape_q, keys, dtype, seed=0):
  rng = np.random.default_rng(seed)
  batch, _, heads, head_dim = shape_q
  shape_kv = (batch, keys, heads, head_dim)
  return [
    jnp.asarray(rng.standard_normal(shape), dtype)
    for shape in (shape_q, shape_kv, shape_kv)
  ]


# (batch, queries, heads, head_dim) and keys: ViT-Ti/16's 197 tokens; 577
# (384 px), whose queries split into blocks with a shorter last one; fewer
# keys than queries; one query (the MAP head's probe); a tiny head; and a
# head wider than 64 (ViT-H/14's 80), which is not padded.
ATTENTION_SHAPES = [
  ((2, 197, 3, 64), 197),
  ((1, 577, 2, 64), 577),
  ((2, 40, 2, 16), 9),
  ((2, 1, 2, 16), 9),
  ((3, 17, 4, 16), 17),
  ((1, 33, 2, 80), 33),
]
# Per dtype, the error of one rounding of the weights and of the result
# (bfloat16: 2^-8 relative) on outputs of magnitude about 1, with float32
# accumulation; float32 rounds at 2^-24.
ATTENTION_TOLERANCE = {'float32': 2e-5, 'bfloat16': 2e-2}


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('shape_q, keys', ATTENTION_SHAPES)
def test_attention_matches_float64(shape_q, keys, dtype):
  q, k, v = attention_inputs(shape_q, keys, dtype)
  out = jax.jit(onednn.attention)(q, k, v)
  assert out.dtype == q.dtype and out.shape == q.shape
  np.testing.assert_allclose(
    np.asarray(out, np.float64),
    ref.dot_product_attention(q, k, v),
    atol=ATTENTION_TOLERANCE[dtype],
  )


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('shape_q, keys', ATTENTION_SHAPES)
def test_attention_gradients_match_float64(shape_q, keys, dtype):
  q, k, v = attention_inputs(shape_q, keys, dtype, seed=1)
  rng = np.random.default_rng(2)
  cotangent = rng.standard_normal(shape_q)

  def loss(*x):
    return jnp.sum(onednn.attention(*x).astype(jnp.float32) * cotangent)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  inputs = [np.asarray(x, np.float64) for x in (q, k, v)]
  # Against central differences of the float64 function along a random
  # direction per input (exact up to O(step^2) for this smooth function).
  for i, grad in enumerate(grads):
    assert grad.dtype == q.dtype and grad.shape == inputs[i].shape
    direction = rng.standard_normal(inputs[i].shape)
    step = 1e-5
    plus, minus = list(inputs), list(inputs)
    plus[i] = plus[i] + step * direction
    minus[i] = minus[i] - step * direction
    numeric = np.sum(
      (ref.dot_product_attention(*plus) - ref.dot_product_attention(*minus))
      * cotangent
    ) / (2 * step)
    analytic = np.sum(np.asarray(grad, np.float64) * direction)
    # Each gradient element carries about one rounding of its dtype; summed
    # over n elements with random signs that grows as sqrt(n).
    bound = ATTENTION_TOLERANCE[dtype] * np.sqrt(direction.size)
    assert abs(analytic - numeric) <= bound, (i, analytic, numeric)


def test_attention_agrees_with_product_attention_in_float32():

  q, k, v = attention_inputs((2, 197, 3, 64), 197, 'float32')
  cotangent = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape))

  def run(attend):
    out, vjp = jax.vjp(attend, q, k, v)
    return [out, *vjp(cotangent.astype(q.dtype))]

  for ours, theirs in zip(
    jax.jit(lambda: run(onednn.attention))(),
    jax.jit(lambda: run(attention.product_attention))(),
    strict=True,
  ):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  'shape_k, shape_v, dtypes, message',
  [
    ((2, 8, 2, 4), (2, 8, 2, 5), ('float32',) * 3, 'key and value of one'),
    ((2, 8, 3, 4), (2, 8, 3, 4), ('float32',) * 3, 'same batch, heads'),
    ((2, 8, 2, 4), (2, 8, 2, 4), ('float32', 'bfloat16', 'float32'), 'all'),
    ((2, 8, 2, 4), (2, 8, 2, 4), ('float16',) * 3, 'all bfloat16 or all'),
  ],
)
def test_attention_refuses_other_shapes_and_dtypes(
  shape_k, shape_v, dtypes, message
):
  q = jnp.zeros((2, 8, 2, 4), dtypes[0])
  k, v = jnp.zeros(shape_k, dtypes[1]), jnp.zeros(shape_v, dtypes[2])
  with pytest.raises(ValueError, match=message):
    onednn.attention(q, k, v)


def test_attention_runs_inside_shard_map_per_image():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  spec = jax.sharding.PartitionSpec('data')
  q, k, v = attention_inputs((8, 17, 2, 16), 17, 'float32')
  attend = jax.jit(
    jax.shard_map(
      onednn.attention, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec
    )
  )
  np.testing.assert_allclose(
    np.asarray(attend(q, k, v), np.float64),
    ref.dot_product_attention(q, k, v),
    atol=ATTENTION_TOLERANCE['float32'],
  )


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('shape_q, keys', ATTENTION_SHAPES)
def test_kept_weights_give_the_recomputed_gradients_to_the_bit(
  monkeypatch, shape_q, keys, dtype
):
  q, k, v = attention_inputs(shape_q, keys, dtype, seed=4)
  cotangent = jnp.asarray(np.random.default_rng(5).standard_normal(shape_q))
  batch, queries, heads, _ = shape_q
  kept_type = f'tensor<{batch}x{heads}x{queries}x{keys}x'

  def gradients(max_bytes):
    monkeypatch.setattr(onednn, 'KEPT_WEIGHTS_MAX_BYTES', max_bytes)

    def loss(*x):
      return jnp.sum(onednn.attention(*x).astype(jnp.float32) * cotangent)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad(q, k, v), grad.lower(q, k, v).as_text()

  kept, kept_hlo = gradients(2**40)
  recomputed, recomputed_hlo = gradients(0)
  # The forward call's second result: the weights, or an empty array.
  assert kept_type in kept_hlo and kept_type not in recomputed_hlo
  for a, b in zip(kept, recomputed, strict=True):
    np.testing.assert_array_equal(a, b)


def test_kept_weights_inside_shard_map_give_its_gradients():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  spec = jax.sharding.PartitionSpec('data')
  q, k, v = attention_inputs((8, 17, 2, 16), 17, 'float32')
  assert onednn.keeps_weights(q, k)

  def loss(attend, *x):
    return jnp.sum(attend(*x) ** 2)

  sharded = jax.shard_map(
    onednn.attention, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec
  )
  grads = jax.jit(jax.grad(functools.partial(loss, sharded), (0, 1, 2)))
  expected = jax.jit(
    jax.grad(functools.partial(loss, onednn.attention), (0, 1, 2))
  )
  for a, b in zip(grads(q, k, v), expected(q, k, v), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_kept_weights_of_another_size_are_refused_by_the_call():
  # Called directly (onednn.attention always passes the right size).
  q, k, v = attention_inputs((2, 17, 2, 16), 17, 'float32')
  call = jax.ffi.ffi_call(
    onednn.ATTENTION_TARGETS[0],
    (
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((2, 2, 17, 16), q.dtype),  # 16 keys, not 17.
    ),
  )
  with pytest.raises(Exception, match='kept weights must be an empty array'):
    jax.block_until_ready(call(q, k, v, scale=np.float32(0.25)))

"""The attention option: which implementation runs, and that they agree."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from helpers import (
  init_params,
  needs_custom_calls,
  random_images,
  randomize,
  squared_output_gradients,
  tiny_vit,
)
from vit_jax import checkpoints
from vit_jax.models import attention, common

needs_onednn = needs_custom_calls('onednn')
# The implementations that compute the same function on this CPU.
CPU_IMPLEMENTATIONS = [
  'xla',
  'product',
  pytest.param('onednn', marks=needs_onednn),
]


def test_auto_picks_product_for_bfloat16_and_xla_for_float32_on_cpus():
  # The tests' 8 CPU devices: XLA partitions attention itself.
  assert jax.default_backend() == 'cpu' and jax.device_count() > 1
  assert attention.resolve_implementation('auto', jnp.bfloat16, 64)[0] == (
    'product'
  )
  assert attention.resolve_implementation('auto', jnp.float32, 64)[0] == 'xla'


@needs_onednn
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_auto_picks_onednn_on_one_cpu_device(monkeypatch, dtype):
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  assert attention.resolve_implementation('auto', dtype, 64) == (
    'onednn',
    f'{jnp.dtype(dtype).name} on one CPU device',
  )


def test_auto_without_onednn_falls_back(monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  monkeypatch.setattr(
    common, 'custom_call_problem', lambda library: 'no oneDNN.'
  )
  assert attention.resolve_implementation('auto', jnp.bfloat16, 64)[0] == (
    'product'
  )
  assert attention.resolve_implementation('auto', jnp.float32, 64)[0] == 'xla'
  with pytest.raises(ValueError, match=r"attention='onednn' .*no oneDNN"):
    attention.resolve_implementation('onednn', jnp.float32, 64)


@pytest.mark.parametrize(
  'dtype, expected', [('bfloat16', 'product'), ('float32', 'xla')]
)
def test_model_logs_and_runs_what_auto_picked(caplog, dtype, expected):
  model = tiny_vit(dtype=dtype)
  images = jnp.zeros((2, 16, 16, 3))
  with caplog.at_level(logging.INFO):
    jaxpr = str(jax.make_jaxpr(model.init)(jax.random.key(0), images))
  picked = [r.getMessage() for r in caplog.records if 'attention' in r.msg]
  assert len(picked) == 1, picked  # once per trace, not once per layer
  assert f"(attention='auto'): {expected} (" in picked[0]
  # product_attention is a custom_vjp; XLA's attention is plain primitives.
  assert ('product_attention' in jaxpr) == (expected == 'product')


def test_explicit_cudnn_on_cpu_is_a_clear_error():
  model = tiny_vit(dtype='bfloat16', attention='cudnn')
  with pytest.raises(ValueError, match="attention='cudnn'") as e:
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  message = str(e.value)
  assert 'NVIDIA GPU' in message and "'xla'" in message and 'cpu' in message


def test_unknown_attention_is_an_error():
  model = tiny_vit(attention='flash')
  with pytest.raises(ValueError, match=r"Unknown attention .*'flash'"):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


@pytest.mark.parametrize(
  'capability, dtype, head_dim, problem',
  [
    ((9, 0), jnp.bfloat16, 64, None),
    ((8, 0), jnp.bfloat16, 128, None),
    ((9, 0), jnp.float16, 256, None),
    (None, jnp.bfloat16, 64, 'NVIDIA GPU'),
    ((7, 5), jnp.bfloat16, 64, 'compute capability'),
    ((9, 0), jnp.float32, 64, 'bfloat16'),
    ((9, 0), jnp.bfloat16, 60, 'multiple of 8'),
    ((8, 6), jnp.bfloat16, 192, 'at most 128'),
    ((9, 0), jnp.bfloat16, 264, 'at most 256'),
  ],
)
def test_cudnn_constraints(capability, dtype, head_dim, problem):
  got = attention.cudnn_problem(capability, dtype, head_dim)
  if problem is None:
    assert got is None
  else:
    assert problem in got


@pytest.mark.parametrize('classifier', ['token', 'map'])
@pytest.mark.parametrize('other', CPU_IMPLEMENTATIONS[1:])
def test_implementations_agree_with_each_other_and_numpy(classifier, other):
  images = random_images((2, 16, 16, 3))
  model = tiny_vit(attention='xla', classifier=classifier)
  params = randomize(init_params(model, images))
  outputs = {
    name: jax.jit(model.clone(attention=name).apply)({'params': params}, images)
    for name in ('xla', other)
  }
  flat = {
    k: v.astype(np.float64)
    for k, v in checkpoints.npz.to_published(params).items()
  }
  expected = ref.vit(
    flat, np.asarray(images, np.float64), 4, 2, classifier=classifier
  )
  for out in outputs.values():
    assert np.max(np.abs(np.asarray(out, np.float64) - expected)) <= 1e-4
  np.testing.assert_allclose(outputs['xla'], outputs[other], rtol=0, atol=1e-5)


@pytest.mark.parametrize('other', CPU_IMPLEMENTATIONS[1:])
def test_gradients_agree_with_xla(other):
  images = random_images((2, 16, 16, 3))
  model = tiny_vit(attention='xla')
  params = randomize(init_params(model, images))

  def grads(name):
    return squared_output_gradients(model.clone(attention=name), params, images)

  for a, b in zip(
    jax.tree.leaves(grads('xla')),
    jax.tree.leaves(grads(other)),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batch_chunks_keep_float32_logits_small(monkeypatch):
  # Several devices: XLA partitions the batch itself, never chunked here.
  assert attention.batch_chunks(8, 12, 577, 577) == [(0, 8)]
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  # ViT-B/16 at 224 px (1.9 MB of logits per image): one piece; at 384 px
  # (16 MB per image): pairs of images, 32 MB each.
  assert attention.batch_chunks(8, 12, 197, 197) == [(0, 8)]
  assert attention.batch_chunks(8, 12, 577, 577) == [
    (0, 2),
    (2, 4),
    (4, 6),
    (6, 8),
  ]
  # Larger than the limit per image: one image at a time; uneven batches.
  assert attention.batch_chunks(3, 16, 1025, 1025) == [(0, 1), (1, 2), (2, 3)]
  assert attention.batch_chunks(5, 12, 577, 577)[-1] == (4, 5)


@pytest.mark.parametrize('dtype, tol', [('float32', 1e-5), ('bfloat16', 3e-2)])
def test_chunked_product_attention_matches_numpy(monkeypatch, dtype, tol):
  batch, length, heads, head_dim = 3, 40, 2, 8
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  # One image's logits fill the limit: three chunks of one image.
  monkeypatch.setattr(attention, '_CHUNK_LOGITS_BYTES', heads * length**2 * 4)
  assert len(attention.batch_chunks(batch, heads, length, length)) == 3
  rng = np.random.default_rng(0)
  inputs = [
    jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), dtype)
    for _ in range(3)
  ]
  cotangent = rng.standard_normal((batch, length, heads, head_dim))

  q, k, v = (np.asarray(x, np.float64) for x in inputs)
  attend = attention.product_attention
  out = jax.jit(attend)(*inputs)
  np.testing.assert_allclose(
    np.asarray(out, np.float64), ref.dot_product_attention(q, k, v), atol=tol
  )

  def loss(*x):
    return jnp.sum(attend(*x).astype(jnp.float32) * cotangent)

  def count(function):  # How many matmuls `function` runs.
    return str(jax.make_jaxpr(function)(*inputs)).count('dot_general')

  gradient = jax.grad(loss, argnums=(0, 1, 2))
  # 5: four products and one row sum.
  assert count(attend) == 2 * 3
  assert count(gradient) == (2 + 5) * 3
  grads = jax.jit(gradient)(*inputs)
  # Against central differences of the float64 reference, along a random
  # direction of each input.
  for i, grad in enumerate(grads):
    direction = rng.standard_normal(q.shape)
    step = 1e-6
    plus, minus = [q, k, v], [q, k, v]
    plus[i] = plus[i] + step * direction
    minus[i] = minus[i] - step * direction
    numeric = np.sum(
      (ref.dot_product_attention(*plus) - ref.dot_product_attention(*minus))
      * cotangent
    ) / (2 * step)
    analytic = np.sum(np.asarray(grad, np.float64) * direction)
    assert abs(analytic - numeric) <= 30 * tol * max(1.0, abs(numeric)), i
  # The same as one piece, whose products see the same numbers.
  monkeypatch.setattr(attention, '_CHUNK_LOGITS_BYTES', 1 << 40)
  gradient = jax.grad(loss, argnums=(0, 1, 2))
  assert count(gradient) == 2 + 5
  whole = jax.jit(gradient)(*inputs)
  for a, b in zip(grads, whole, strict=True):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=tol
    )

"""The matmul option: which library runs the dense products, and agreement."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from helpers import (
  TINY_VIT,
  init_params,
  random_images,
  randomize,
  squared_output_gradients,
  tiny_vit,
)
from vit_jax import checkpoints
from vit_jax.kernels import onednn
from vit_jax.models import common

needs_onednn = pytest.mark.skipif(
  onednn.problem() is not None,
  reason=f'oneDNN custom calls unavailable: {onednn.problem()}',
)


def custom_calls(function, *args) -> int:
  """How many oneDNN products `function(*args)` runs."""
  lowered = jax.jit(function).lower(*args).as_text()
  return lowered.count(f'stablehlo.custom_call @{onednn.TARGET}(')


def test_auto_keeps_xla_with_several_devices_and_in_float32(monkeypatch):
  assert jax.device_count() == 8  # tests/conftest.py
  assert common.resolve_matmul('auto', 'bfloat16') == ('xla', '8 devices')
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  assert common.resolve_matmul('auto', 'float32') == ('xla', 'float32 compute')
  monkeypatch.setattr(onednn, 'problem', lambda: 'no oneDNN here.')
  assert common.resolve_matmul('auto', 'bfloat16') == (
    'xla',
    'oneDNN cannot run: no oneDNN here.',
  )
  monkeypatch.setattr(onednn, 'problem', lambda: None)
  assert common.resolve_matmul('auto', 'bfloat16') == (
    'mixed',
    'bfloat16 on one CPU device',
  )


def test_auto_keeps_xla_off_cpus(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert common.resolve_matmul('auto', 'bfloat16') == ('xla', 'gpu, not a CPU')
  for name in ('onednn', 'mixed'):
    with pytest.raises(ValueError, match=f"matmul='{name}' cannot run here"):
      common.resolve_matmul(name, 'bfloat16')


def test_unknown_or_impossible_matmul_is_a_clear_error(monkeypatch):
  with pytest.raises(ValueError, match=r"Unknown matmul 'mkl'"):
    tiny_vit(matmul='mkl').init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  monkeypatch.setattr(onednn, 'problem', lambda: 'oneDNN was not found.')
  with pytest.raises(ValueError) as e:
    tiny_vit(matmul='onednn').init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert 'oneDNN was not found.' in str(e.value) and "'xla'" in str(e.value)


def test_model_logs_what_it_picked(caplog):
  model = tiny_vit(dtype='bfloat16')
  with caplog.at_level(logging.INFO):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  picked = [r.getMessage() for r in caplog.records if 'dense' in r.msg]
  assert picked == ["ViT dense products (matmul='auto'): xla (8 devices)."]


@needs_onednn
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('classifier', ['token', 'map'])
def test_onednn_model_matches_numpy_and_xla(dtype, classifier):
  images = random_images((2, 16, 16, 3))
  model = tiny_vit(dtype=dtype, classifier=classifier, matmul='xla')
  params = randomize(init_params(model, images))
  variables = {'params': params}
  onednn_model = model.clone(matmul='onednn')
  # Every dense product of the blocks (q, k, v, out, two MLP layers) and
  # the MAP head's, in oneDNN; the stem and the head stay XLA's.
  blocks = TINY_VIT['num_layers'] + (classifier == 'map')
  assert custom_calls(onednn_model.apply, variables, images) == 6 * blocks
  assert custom_calls(model.apply, variables, images) == 0
  # 2 images x 17 tokens: too few rows for 'mixed' to leave XLA.
  mixed = model.clone(matmul='mixed')
  assert custom_calls(mixed.apply, variables, images) == 0
  out = jax.jit(onednn_model.apply)(variables, images)
  flat = {
    k: v.astype(np.float64)
    for k, v in checkpoints.npz.to_published(params).items()
  }
  expected = ref.vit(
    flat, np.asarray(images, np.float64), 4, 2, classifier=classifier
  )
  tolerance = 0.05 if dtype == 'bfloat16' else 1e-4
  assert np.max(np.abs(np.asarray(out, np.float64) - expected)) <= tolerance
  xla_out = jax.jit(model.apply)(variables, images)
  np.testing.assert_allclose(out, xla_out, rtol=0, atol=tolerance / 10)


@needs_onednn
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('matmul, forward_calls', [('onednn', 6), ('mixed', 0)])
def test_onednn_gradients_match_xla(dtype, matmul, forward_calls):
  images = random_images((2, 16, 16, 3))
  model = tiny_vit(dtype=dtype, matmul='xla')
  params = randomize(init_params(model, images))

  def grads(matmul):
    return squared_output_gradients(model.clone(matmul=matmul), params, images)

  # Two backward products per forward product, all in oneDNN.
  def loss(p):
    return jnp.sum(model.clone(matmul=matmul).apply({'params': p}, images))

  calls = custom_calls(jax.grad(loss), params)
  assert calls == (forward_calls + 12) * TINY_VIT['num_layers']
  expected, got = grads('xla'), grads(matmul)
  # One scale for all: some gradients are zero up to rounding (the key
  # bias's: softmax ignores a constant added to every logit).
  scale = max(np.max(np.abs(g)) for g in jax.tree.leaves(expected))
  for path, want in jax.tree_util.tree_leaves_with_path(expected):
    have = got
    for key in path:
      have = have[key.key]
    assert have.dtype == jnp.float32, path
    np.testing.assert_allclose(
      have, want, rtol=0, atol=scale * (2e-2 if dtype == 'bfloat16' else 1e-5),
      err_msg=jax.tree_util.keystr(path),
    )  # fmt: skip


@needs_onednn
@pytest.mark.parametrize('matmul', ['mixed', 'onednn', 'xla'])
def test_mixed_runs_large_forward_products_in_onednn(matmul):
  threshold = common.MIXED_ONEDNN_MIN_ROWS
  kernel = jnp.ones((8, 4), jnp.float32)
  dimension_numbers = (((2,), (0,)), ((), ()))

  def forward_calls(rows):
    activations = jnp.ones((rows // 4, 4, 8), jnp.float32)
    return custom_calls(
      lambda x, w: common.mixed_dot_general(
        x, w, dimension_numbers, jnp.bfloat16, jnp.float32, matmul
      ),
      activations,
      kernel,
    )

  expected = {
    'mixed': (0, 1),
    'onednn': (1, 1),
    'xla': (0, 0),
  }[matmul]
  assert (forward_calls(threshold - 4), forward_calls(threshold)) == expected

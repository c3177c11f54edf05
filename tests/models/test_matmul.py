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
  needs_custom_calls,
  random_images,
  randomize,
  squared_output_gradients,
  tiny_vit,
)
from vit_jax import checkpoints
from vit_jax.kernels import custom_calls, mkl, onednn
from vit_jax.models import common

needs_onednn = needs_custom_calls('onednn')
needs_mkl = needs_custom_calls('mkl')
# The products of each custom-call implementation, where it can run.
LIBRARY_MATMULS = [
  pytest.param('onednn', marks=needs_onednn),
  pytest.param('mkl', marks=needs_mkl),
]
TARGETS = {'onednn': onednn.TARGET, 'mixed': onednn.TARGET, 'mkl': mkl.TARGET}


def count_custom_calls(function, *args, matmul: str = 'onednn') -> int:
  """How many products `function(*args)` runs in `matmul`'s custom call."""
  lowered = jax.jit(function).lower(*args).as_text()
  return lowered.count(f'stablehlo.custom_call @{TARGETS[matmul]}(')


def test_auto_on_one_cpu_device_mkl_for_float32_onednn_for_bfloat16(
  monkeypatch,
):
  assert jax.device_count() == 8  # tests/conftest.py
  assert common.resolve_matmul('auto', 'bfloat16') == ('xla', '8 devices')
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  monkeypatch.setattr(custom_calls, 'cpu_vendor', lambda: 'GenuineIntel')
  monkeypatch.setattr(mkl, 'problem', lambda: None)
  monkeypatch.setattr(onednn, 'problem', lambda: None)
  assert common.resolve_matmul('auto', 'float32') == (
    'mkl',
    'float32 on one CPU device',
  )
  assert common.resolve_matmul('auto', 'bfloat16') == (
    'mixed',
    'bfloat16 on one CPU device',
  )
  monkeypatch.setattr(onednn, 'problem', lambda: 'no oneDNN here.')
  assert common.resolve_matmul('auto', 'bfloat16') == (
    'mkl',
    'bfloat16 on one CPU device; oneDNN cannot run: no oneDNN here.',
  )
  monkeypatch.setattr(mkl, 'problem', lambda: 'no MKL here.')
  assert common.resolve_matmul('auto', 'float32') == (
    'xla',
    'MKL cannot run: no MKL here.',
  )
  assert common.resolve_matmul('auto', 'bfloat16') == (
    'xla',
    'oneDNN cannot run: no oneDNN here.; MKL cannot run: no MKL here.',
  )


def test_auto_passes_mkl_over_off_intel_cpus(monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  monkeypatch.setattr(custom_calls, 'cpu_vendor', lambda: 'AuthenticAMD')

  def build_mkl():
    raise AssertionError('MKL was built where auto would not pick it.')

  monkeypatch.setattr(mkl, 'problem', build_mkl)
  monkeypatch.setattr(onednn, 'problem', lambda: None)
  not_picked = (
    "MKL not picked: its fast kernels are Intel's, and this CPU is "
    'AuthenticAMD.'
  )
  assert common.resolve_matmul('auto', 'float32') == ('xla', not_picked)
  assert common.resolve_matmul('auto', 'bfloat16') == (
    'mixed',
    'bfloat16 on one CPU device',
  )
  monkeypatch.setattr(onednn, 'problem', lambda: 'no oneDNN here.')
  assert common.resolve_matmul('auto', 'bfloat16') == (
    'xla',
    f'oneDNN cannot run: no oneDNN here.; {not_picked}',
  )
  # Asked for by name, MKL runs on any CPU.
  monkeypatch.setattr(mkl, 'problem', lambda: None)
  assert common.resolve_matmul('mkl', 'float32') == ('mkl', 'set explicitly')
  monkeypatch.setattr(custom_calls, 'cpu_vendor', lambda: '')
  assert 'this CPU is of an unknown vendor.' in mkl.unsuited()


def test_cpu_vendor_is_read_from_cpuinfo(tmp_path):
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text(
    'processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n'
  )
  assert custom_calls.cpu_vendor(cpuinfo) == 'AuthenticAMD'
  cpuinfo.write_text('processor\t: 0\n')
  assert custom_calls.cpu_vendor.__wrapped__(cpuinfo) == ''
  assert custom_calls.cpu_vendor(tmp_path / 'missing') == ''


def test_auto_keeps_xla_off_cpus(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert common.resolve_matmul('auto', 'bfloat16') == ('xla', 'gpu, not a CPU')
  for name in ('mkl', 'onednn', 'mixed'):
    with pytest.raises(ValueError, match=f"matmul='{name}' cannot run here"):
      common.resolve_matmul(name, 'bfloat16')


def test_unknown_or_impossible_matmul_is_a_clear_error(monkeypatch):
  with pytest.raises(ValueError, match=r"Unknown matmul 'blas'"):
    tiny_vit(matmul='blas').init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  monkeypatch.setattr(onednn, 'problem', lambda: 'oneDNN was not found.')
  monkeypatch.setattr(mkl, 'problem', lambda: 'MKL was not found.')
  for matmul, why in (('onednn', 'oneDNN'), ('mkl', 'MKL')):
    with pytest.raises(ValueError) as e:
      tiny_vit(matmul=matmul).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    assert f'{why} was not found.' in str(e.value) and "'xla'" in str(e.value)


def test_model_logs_what_it_picked(caplog):
  model = tiny_vit(dtype='bfloat16')
  with caplog.at_level(logging.INFO):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  picked = [r.getMessage() for r in caplog.records if 'dense' in r.msg]
  assert picked == ["ViT dense products (matmul='auto'): xla (8 devices)."]


@pytest.mark.parametrize('library', LIBRARY_MATMULS)
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('classifier', ['token', 'map'])
def test_library_model_matches_numpy_and_xla(library, dtype, classifier):
  images = random_images((2, 16, 16, 3))
  model = tiny_vit(dtype=dtype, classifier=classifier, matmul='xla')
  params = randomize(init_params(model, images))
  variables = {'params': params}
  library_model = model.clone(matmul=library)
  # Every dense product of the blocks (q, k, v, out, two MLP layers) and
  # the MAP head's, in the library; the stem and the head stay XLA's.
  blocks = TINY_VIT['num_layers'] + (classifier == 'map')
  calls = count_custom_calls(
    library_model.apply, variables, images, matmul=library
  )
  assert calls == 6 * blocks
  assert count_custom_calls(model.apply, variables, images, matmul=library) == 0
  if library == 'onednn':
    # 2 images x 17 tokens: too few rows for 'mixed' to leave XLA.
    mixed = model.clone(matmul='mixed')
    assert (
      count_custom_calls(mixed.apply, variables, images, matmul='mixed') == 0
    )
  out = jax.jit(library_model.apply)(variables, images)
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


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize(
  'matmul, forward_calls',
  [
    pytest.param('mkl', 6, marks=needs_mkl),
    pytest.param('onednn', 6, marks=needs_onednn),
    pytest.param('mixed', 0, marks=needs_onednn),
  ],
)
def test_library_gradients_match_xla(dtype, matmul, forward_calls):
  images = random_images((2, 16, 16, 3))
  model = tiny_vit(dtype=dtype, matmul='xla')
  params = randomize(init_params(model, images))

  def grads(matmul):
    return squared_output_gradients(model.clone(matmul=matmul), params, images)

  # Two backward products per forward product, all in oneDNN.
  def loss(p):
    return jnp.sum(model.clone(matmul=matmul).apply({'params': p}, images))

  calls = count_custom_calls(jax.grad(loss), params, matmul=matmul)
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
    return count_custom_calls(
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

"""The benchmark job on a tiny model: every field of its JSON, sane."""

import functools
import json
import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import benchmark as benchmark_config
from helpers import COMPILATION_CACHE_FLAG, TINY_VIT, needs_custom_calls
from vit_jax import models
from vit_jax.analysis import measure
from vit_jax.jobs import benchmark
from vit_jax.kernels import mkl
from vit_jax.models import common, vit

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  config = benchmark_config.get_config('ViT-B_16')
  config.model.update(patch_size=4, **TINY_VIT)
  config.num_classes = 10
  config.image_size = 16
  config.batch_size = 8
  config.benchmark.warmup_steps = 1
  config.benchmark.steps = 3
  config.benchmark.peak_matmul_size = 256
  workdir = tmp_path_factory.mktemp('benchmark')
  returned = benchmark.run(config, str(workdir))
  written = json.loads((workdir / 'benchmark.json').read_text())
  assert written == json.loads(json.dumps(returned))
  return written


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.parametrize('key', ['train', 'inference'])
def test_rates(results, key):
  r = results[key]
  rates = r['images_per_s']
  assert set(rates) == {'median', 'min', 'max'}
  assert all(_positive(v) for v in rates.values())
  assert rates['min'] <= rates['median'] <= rates['max']
  assert set(r['step_s']) == {'median', 'min', 'max'}
  assert r['step_s']['min'] <= r['step_s']['median'] <= r['step_s']['max']
  assert math.isclose(
    rates['median'] * r['step_s']['median'], results['batch_size'], rel_tol=0.5
  )
  assert _positive(r['flops_per_step'])
  assert _positive(r['model_flops_per_s'])
  assert 0 < r['mfu'] < 1


def test_flops_count_three_forward_passes_per_training_step(results):
  forward = results['forward_flops_per_image'] * results['batch_size']
  assert results['inference']['flops_per_step'] == forward
  assert results['train']['flops_per_step'] == 3 * forward
  assert math.isfinite(results['train']['final_loss'])


def test_compile_and_cache_fields(results):
  compile_info = results['compile']
  for key in ('lower_s', 'compile_s', 'total_s'):
    assert _positive(compile_info[key])
  assert isinstance(compile_info['cache_hit'], bool)
  assert isinstance(compile_info['cache_written'], bool)
  assert 'cache_dir' in compile_info


def test_machine_memory_and_setting_fields(results):
  assert _positive(results['peak']['flops_per_s'])
  assert results['peak']['matmul_size'] == 256
  memory = results['memory']
  assert memory['host_peak_bytes'] >= memory['host_baseline_bytes'] > 0
  # The CPU backend exposes no device memory statistics.
  assert set(memory['device']) == {
    'peak_bytes',
    'max_device_peak_bytes',
    'limit_bytes',
  }
  step = memory['step_bytes']
  assert set(step) == {'argument', 'output', 'temp', 'alias', 'total'}
  assert all(isinstance(v, int) and v >= 0 for v in step.values())
  assert step['total'] == (
    step['argument'] + step['output'] + step['temp'] - step['alias']
  )
  assert step['argument'] > 0 and step['alias'] > 0  # The donated state.
  assert results['backend'] == jax.default_backend() == 'cpu'
  assert results['host_allocator'] == measure.host_allocator()
  assert results['host_allocator'] in ('glibc', *measure._ALLOCATORS)
  assert results['device_count'] == jax.device_count()
  assert results['mesh'] == {'data': jax.device_count(), 'model': 1}
  assert results['process_count'] == 1
  assert _positive(results['host_to_device_s'])
  assert _positive(results['params'])
  assert results['model'] == 'ViT-B_16'
  assert (results['image_size'], results['batch_size']) == (16, 8)
  assert results['dtype'] == 'bfloat16'
  assert results['matmul'] == 'xla'  # 'auto' with 8 devices
  assert results['attention'] == 'product'  # likewise, bfloat16
  assert results['optimizer'] == 'sgd'
  assert results['ema_decay'] == 0.0
  assert results['step'] == 'jit'
  assert results['sharding'] == 'dp'
  assert results['remat_policy'] == 'none'
  assert results['scan'] is False
  for key in ('device_kind', 'jax_version'):
    assert isinstance(results[key], str) and results[key]


def test_attention_is_reported_for_vits_only():
  vit_model = models.get_model(
    'ViT-B_16', 10, patch_size=4, dtype='float32', **TINY_VIT
  )
  assert benchmark._attention(vit_model) == 'xla'  # float32, 8 devices
  assert benchmark._attention(vit_model.clone(attention='product')) == (
    'product'
  )
  assert benchmark._attention(models.get_model('BiT-R50x1', 10)) is None


def test_polyak_averaging_is_part_of_the_benchmarked_step():
  config = benchmark_config.get_config('ViT-B_16')
  config.model.update(patch_size=4, **TINY_VIT)
  config.num_classes, config.image_size, config.batch_size = 10, 16, 8
  config.ema_decay = 0.9
  setup = benchmark.build(config)
  state = setup.new_state()
  before = jax.device_get(state.ema_params)
  new, _ = setup.train_step(state, setup.batch)
  after, params = jax.device_get((new.ema_params, new.params))
  # The average moves a tenth of the way to the updated parameters.
  expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, before, params)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
    after,
    expected,
  )
  moved = jax.tree.map(lambda a, b: np.any(a != b), after, before)
  assert any(jax.tree.leaves(moved))


def test_table_lists_the_rates(results):
  table = benchmark.format_table(results)
  assert 'train img/s' in table and 'inference img/s' in table
  assert 'MFU' in table and 'matmul=xla, attention=product' in table
  (step_row,) = [row for row in table.splitlines() if 'step memory' in row]
  step_mib = results['memory']['step_bytes']['total'] / 2**20
  assert step_mib > 0 and f' {step_mib:,.1f} MiB' in step_row


# ----------------------------------------------------------------------------
# The compute paths behind the benchmark's bfloat16 figures.


def _random(shape, seed, dtype='float32'):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


@pytest.mark.parametrize(
  'lhs_shape, rhs_shape, dimension_numbers',
  [
    ((4, 5, 6), (6, 7), (((2,), (0,)), ((), ()))),  # Dense
    ((4, 5, 6), (6, 3, 2), (((2,), (0,)), ((), ()))),  # query/key/value
    ((4, 5, 3, 2), (3, 2, 6), (((2, 3), (0, 1)), ((), ()))),  # out
    ((2, 5, 3, 4), (2, 6, 3, 4), (((3,), (3,)), ((0, 2), (0, 2)))),
    ((6, 4), (5, 6), (((0,), (1,)), ((), ()))),
  ],
)
def test_mixed_dot_general_gradients(lhs_shape, rhs_shape, dimension_numbers):
  lhs, rhs = _random(lhs_shape, 0), _random(rhs_shape, 1)

  def plain(a, b):
    return jax.lax.dot_general(a, b, dimension_numbers)

  out, plain_vjp = jax.vjp(plain, lhs, rhs)
  g = _random(out.shape, 2)
  expected = plain_vjp(g)
  for dtype, tol in (('float32', 1e-5), ('bfloat16', 2e-2)):

    def mixed(a, b, dtype=dtype):
      return common.mixed_dot_general(a, b, dimension_numbers, dtype, 'float32')

    got = jax.vjp(mixed, lhs, rhs)[1](g)
    for e, x in zip(expected, got, strict=True):
      assert x.dtype == jnp.float32  # The operands' own dtype.
      err = float(jnp.linalg.norm(x - e) / jnp.linalg.norm(e))
      assert err < tol, (dtype, err)


@pytest.mark.parametrize('dtype, tol', [('float32', 1e-5), ('bfloat16', 2e-2)])
def test_product_attention_agrees_with_jax_nn(dtype, tol):
  q, k, v = (_random((2, 7, 3, 8), seed) for seed in range(3))
  weights = _random((2, 7, 3, 8), 3)

  def loss(attention, q, k, v):
    out = attention(q.astype(dtype), k.astype(dtype), v.astype(dtype))
    return jnp.sum(out.astype(jnp.float32) * weights)

  expected = jax.value_and_grad(
    functools.partial(loss, jax.nn.dot_product_attention), argnums=(0, 1, 2)
  )(q, k, v)
  got = jax.value_and_grad(
    functools.partial(loss, vit.product_attention), argnums=(0, 1, 2)
  )(q, k, v)
  for e, x in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
    err = float(jnp.linalg.norm(x - e) / jnp.linalg.norm(e))
    assert err < tol, err


def test_attention_path_rule():
  # bfloat16 on CPU takes product_attention; everything else jax.nn's.
  assert vit.use_product_attention(jnp.bfloat16)
  assert not vit.use_product_attention(jnp.float32)


def test_bfloat16_training_step_products_are_bfloat16():
  """No matmul of the bfloat16 gradient falls back to float32 operands.

  The float32 ones are the head's (by design), attention's row sums of
  dO * O in its softmax gradient (elementwise products, not matmuls) and
  LayerNorm's two row means in its backward pass (products of the float32
  gradient with the scale vector, float32 by design).
  """
  model = models.get_model(
    'ViT-B_16', 10, patch_size=4, dtype='bfloat16', **TINY_VIT
  )
  images = jnp.zeros((2, 16, 16, 3))
  params = nn.unbox(model.init(jax.random.key(0), images))['params']

  def loss(p):
    return jnp.sum(model.apply({'params': p}, images) ** 2)

  hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
  dots = [line for line in hlo.splitlines() if 'stablehlo.dot_general' in line]
  operands = [line.split(':')[-1].split('->')[0] for line in dots]
  float32 = [o for o in operands if 'bf16' not in o]
  head = [o for o in float32 if 'x10xf32' in o or '2x10xf32' in o]
  row_sums = [o for o in float32 if o.count('tensor<2x17x4x8xf32>') == 2]
  # Two per LayerNorm: two in each of the 2 blocks and the encoder's last.
  layer_norms = [
    o for o in float32 if 'tensor<2x17x32xf32>, tensor<32xf32>' in o
  ]
  assert len(head) == 3 and len(row_sums) == 2, float32
  assert len(layer_norms) == 2 * 5, float32
  assert len(float32) == 15, float32
  # The patch embedding, a product on CPUs: forward and kernel gradient
  # (the images' gradient is not computed), both bfloat16.
  embedding = [o for o in operands if 'tensor<2x16x4x4x3xbf16>' in o]
  assert len(embedding) == 2, embedding
  # Per block: 6 dense and 2 attention products forward, 12 and 4 backward,
  # the row sum and 2 LayerNorms' 4 row means; 2 blocks, the last
  # LayerNorm's 2, the head's 3 and the patch embedding's 2.
  assert len(dots) == 2 * 29 + 2 + 3 + 2


def test_kernels_cast_once_give_the_same_bfloat16_forward():
  """Pre-cast kernels remove the per-call casts, not a bit of the result."""
  config = benchmark_config.get_config('ViT-B_16')
  config.model.update(patch_size=4, **TINY_VIT)
  config.num_classes = 10
  config.image_size = 16
  config.batch_size = 2
  model, variables, images = benchmark.inference_setup(config)
  cast = common.cast_kernels(variables, 'bfloat16')
  dtypes = jax.tree_util.tree_flatten_with_path(
    jax.tree.map(lambda x: x.dtype, cast)
  )[0]
  for path, dtype in dtypes:
    is_kernel = path[-1].key == 'kernel'
    assert dtype == (jnp.bfloat16 if is_kernel else jnp.float32), path
  assert sum(path[-1].key == 'kernel' for path, _ in dtypes) > 8

  def forward(v):
    return model.apply(v, images, train=False)

  expected, got = jax.jit(forward)(variables), jax.jit(forward)(cast)
  assert got.dtype == expected.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  converts = jax.jit(forward).lower(cast).compile().as_text().count('convert')
  assert converts < jax.jit(forward).lower(variables).compile().as_text().count(
    'convert'
  )


def test_host_allocator_reads_the_mapped_libraries(tmp_path):
  maps = tmp_path / 'maps'
  libc = (
    '7f01-7f02 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6\n'
  )
  maps.write_text(libc)
  assert measure.host_allocator(maps) == 'glibc'
  maps.write_text(
    libc + '7f03-7f04 r-xp 00000000 08:01 43 '
    '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n'
  )
  assert measure.host_allocator(maps) == 'tcmalloc'
  maps.write_text(
    libc + '7f05-7f06 r-xp 0 08:01 44 /opt/lib/libjemalloc.so.2\n'
  )
  assert measure.host_allocator(maps) == 'jemalloc'
  assert measure.host_allocator(tmp_path / 'missing') == ''


def test_cast_kernels_names_a_bad_dtype():
  with pytest.raises(ValueError, match='float16'):
    common.cast_kernels({'kernel': jnp.zeros(2)}, 'float16')


@needs_custom_calls('onednn')
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_one_cpu_device_runs_the_custom_calls(tmp_path, dtype):
  # main.py as a user runs it: one CPU device (no forced host devices).
  env = dict(os.environ)
  env['XLA_FLAGS'] = env['XLA_FLAGS'].replace(
    '--xla_force_host_platform_device_count=8', ''
  )
  env.pop('LD_PRELOAD', None)  # glibc's malloc, and the hint it gets.
  overrides = {
    'model.patch_size': 4,
    **{f'model.{k}': v for k, v in TINY_VIT.items()},
    'num_classes': 10,
    'image_size': 16,
    'batch_size': 8,
    'benchmark.warmup_steps': 1,
    'benchmark.steps': 2,
    'benchmark.peak_matmul_size': 256,
    'model.dtype': dtype,
  }
  run = subprocess.run(
    [
      sys.executable,
      str(ROOT / 'main.py'),
      f'--config={ROOT / "configs/benchmark.py"}:ViT-B_16',
      f'--workdir={tmp_path}',
      COMPILATION_CACHE_FLAG,
      *(f'--config.{k}={v}' for k, v in overrides.items()),
    ],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
    check=False,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  written = json.loads((tmp_path / 'benchmark.json').read_text())
  # bfloat16: oneDNN's products (the forward ones of too few rows stay
  # XLA's); float32: MKL's, where it runs on an Intel CPU.
  matmul, why = 'mixed', 'bfloat16 on one CPU device'
  if dtype == 'float32':
    matmul, why = 'mkl', 'float32 on one CPU device'
    if mkl.unsuited():
      matmul, why = 'xla', f'MKL not picked: {mkl.unsuited()}'
    elif mkl.problem():
      matmul, why = 'xla', f'MKL cannot run: {mkl.problem()}'
  assert written['device_count'] == 1 and written['matmul'] == matmul
  assert written['attention'] == 'onednn'
  assert math.isfinite(written['train']['final_loss'])
  assert f"ViT dense products (matmul='auto'): {matmul} ({why})." in run.stderr
  assert written['host_allocator'] == 'glibc'
  assert 'glibc malloc' in run.stdout
  assert benchmark.GLIBC_MALLOC_HINT in run.stderr
  assert (
    f"ViT attention (attention='auto'): onednn ({dtype} on one CPU "
    'device).' in run.stderr
  )


# Run in a fresh interpreter in which importing TensorFlow, tfds or clu
# fails, as on an accelerator image with JAX alone.
_WITHOUT_TENSORFLOW = """
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.partition('.')[0] in ('tensorflow', 'tensorflow_datasets', 'clu'):
      raise ModuleNotFoundError(f'No module named {name!r}')

sys.meta_path.insert(0, Refuse())
from configs import benchmark as benchmark_config
from vit_jax.jobs import benchmark

config = benchmark_config.get_config('ViT-B_16')
config.update_from_flattened_dict({
  'model.hidden_size': 32, 'model.mlp_dim': 64, 'model.num_heads': 2,
  'model.num_layers': 1, 'model.patch_size': 8, 'image_size': 16,
  'batch_size': 8, 'num_classes': 3,
})
setup = benchmark.build(config)
state, metrics = setup.train_step(setup.new_state(), setup.batch)
print('loss', float(metrics['train_loss']))
"""


def test_benchmark_step_builds_and_runs_without_tensorflow():
  result = subprocess.run(
    [sys.executable, '-c', _WITHOUT_TENSORFLOW],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  # Cross-entropy of a random model over 3 classes: about log(3).
  loss = float(result.stdout.split('loss')[-1])
  assert 0.5 < loss < 2.5

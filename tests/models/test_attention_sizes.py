"""Attention at the paper's sizes against float64 numpy, on every backend.

XLA's and the project's product attention run everywhere, and so does the
padding to even lengths that the cuDNN path takes (with XLA's attention);
oneDNN's blocked attention (vit_jax/kernels) runs on CPUs;
the training step of a model that picks cuDNN is lowered for CUDA here too,
which is where JAX's own checks of cuDNN's constraints run (and the step
as on a TPU, for TPUs). cuDNN's fused
attention itself (and the model with `attention='auto'`, which picks it)
runs only where an NVIDIA GPU is visible, and is skipped elsewhere (CI's
CPUs). The test set-up hides GPUs; on a GPU machine run

  JAX_PLATFORMS=cuda,cpu CUDA_VISIBLE_DEVICES=0 \
    python -m pytest tests/models/test_attention_sizes.py
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from configs import benchmark as benchmark_config
from helpers import (
  TINY_VIT,
  init_params,
  needs_custom_calls,
  random_images,
  randomize,
  tiny_vit,
)
from vit_jax import checkpoints, objectives, sharding, steps, training
from vit_jax.kernels import onednn
from vit_jax.models import attention, common, patch_embedding

on_nvidia_gpu = attention.nvidia_compute_capability() is not None
needs_nvidia_gpu = pytest.mark.skipif(
  not on_nvidia_gpu, reason='needs an NVIDIA GPU (cuDNN)'
)
needs_onednn = needs_custom_calls('onednn')
IMPLEMENTATIONS = [
  'xla',
  'product',
  'xla, even lengths',
  pytest.param('onednn', marks=needs_onednn),
  pytest.param('cudnn', marks=needs_nvidia_gpu),
]
# (tokens, heads, head_dim): ViT-B/32 and B/16 at 224 px, B/16 at 384 px
# (the fine-tuning resolution), L/16 at 224 px, H/14 at 224 px.
SIZES = [
  (50, 12, 64),
  (197, 12, 64),
  (577, 12, 64),
  (197, 16, 64),
  (257, 16, 80),
]


def _inputs(length, heads, head_dim, dtype, batch=2, seed=0, keys=None):
  """Query, key, value and an output cotangent, rounded to `dtype`.

  `keys` keys and values (`length` unless given).
  """
  rng = np.random.default_rng(seed)
  lengths = (length, keys or length, keys or length, length)
  return [
    jnp.asarray(
      rng.standard_normal((batch, n, heads, head_dim), np.float32), dtype
    )
    for n in lengths
  ]


def _reference(q, k, v, g):
  """Output and gradients of sum(out * g) in float64."""
  return [
    ref.dot_product_attention(q, k, v),
    *ref.dot_product_attention_vjp(q, k, v, g),
  ]


def _attention(implementation):
  """The function the model runs for an implementation."""
  if implementation == 'product':
    return attention.product_attention
  if implementation == 'xla, even lengths':
    return functools.partial(
      attention.even_length_attention, implementation='xla'
    )
  if implementation == 'cudnn':
    return functools.partial(
      attention.even_length_attention, implementation='cudnn'
    )
  if implementation == 'onednn':
    return onednn.attention
  return functools.partial(jax.nn.dot_product_attention, implementation='xla')


def _relative_error(got, expected):
  """Largest error over the largest magnitude of the reference."""
  got = np.asarray(got, np.float64)
  return np.max(np.abs(got - expected)) / np.max(np.abs(expected))


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
@pytest.mark.parametrize(
  'length, heads, head_dim, keys',
  [(*size, None) for size in SIZES] + [(1, 12, 64, 196), (1, 12, 64, 197)],
)  # The last two: a MAP head's probe over 196 patches, and over 197 tokens.
def test_bfloat16_attention_and_gradients_match_float64(
  implementation, length, heads, head_dim, keys
):
  q, k, v, g = _inputs(length, heads, head_dim, jnp.bfloat16, keys=keys)
  fn = _attention(implementation)

  @jax.jit
  def run(q, k, v, g):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(g.astype(out.dtype)))

  got = run(q, k, v, g)
  expected = _reference(q, k, v, g)
  # bfloat16 keeps 8 significant bits (a relative step of 2^-8 = 0.4%);
  # the weights and the output are rounded to it at least once each.
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, expected, strict=True):
    assert a.shape == b.shape
    assert _relative_error(a, b) < 2e-2, name


@pytest.mark.parametrize(
  'implementation',
  [
    'xla',
    'product',
    'xla, even lengths',
    pytest.param('onednn', marks=needs_onednn),
  ],
)
@pytest.mark.parametrize('length, keys', [(197, None), (1, 197), (50, None)])
def test_float32_attention_and_gradients_match_float64(
  implementation, length, keys
):
  # Tight enough to see a padded key that is not masked (an error of about
  # 3e-3), which bfloat16's rounding would hide.
  q, k, v, g = _inputs(length, 12, 64, jnp.float32, keys=keys)
  fn = _attention(implementation)

  @jax.jit
  def run(q, k, v, g):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(g))

  # XLA on a GPU may run float32 products in TF32 (10 significant bits).
  tolerance = 2e-3 if jax.default_backend() == 'gpu' else 1e-5
  expected = _reference(q, k, v, g)
  for name, a, b in zip(
    ('out', 'dq', 'dk', 'dv'), run(q, k, v, g), expected, strict=True
  ):
    assert _relative_error(a, b) < tolerance, name


@needs_nvidia_gpu
def test_auto_picks_the_accelerator_paths_on_a_gpu():
  assert attention.resolve_implementation('auto', jnp.bfloat16, 64)[0] == (
    'cudnn'
  )
  # cuDNN's fused attention needs 16-bit inputs.
  assert attention.resolve_implementation('auto', jnp.float32, 64)[0] == 'xla'
  assert common.resolve_matmul('auto', jnp.bfloat16)[0] == 'xla'
  assert patch_embedding.resolve_implementation('auto') == 'conv'


@needs_nvidia_gpu
def test_model_with_cudnn_matches_xla_and_float64():
  images = random_images((4, 16, 16, 3))
  model = tiny_vit(dtype='bfloat16', attention='auto')
  params = randomize(init_params(model, images))
  assert model.resolved_attention()[0] == 'cudnn'

  def loss(p, name):
    logits = model.clone(attention=name).apply({'params': p}, images)
    return jnp.sum(logits.astype(jnp.float32) ** 2), logits

  def run(name):
    return jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
      params, name
    )

  (_, cudnn_logits), cudnn_grads = run('cudnn')
  (_, xla_logits), xla_grads = run('xla')
  flat = {
    k: v.astype(np.float64)
    for k, v in checkpoints.npz.to_published(params).items()
  }
  expected = ref.vit(flat, np.asarray(images, np.float64), 4, 2)
  for logits in (cudnn_logits, xla_logits):
    assert _relative_error(logits, expected) < 5e-2
  for a, b in zip(
    jax.tree.leaves(cudnn_grads), jax.tree.leaves(xla_grads), strict=True
  ):
    assert _relative_error(a, np.asarray(b, np.float64)) < 5e-2


@pytest.fixture
def as_on_a_hopper_gpu(monkeypatch):
  """This CPU process choosing and lowering as on an H100 with cuDNN 9.10.

  JAX asks the GPU for cuDNN's version and compute capability while it
  traces cuDNN's attention; these stand in for both. Every `auto` choice of
  the model (attention, dense products, patch embedding) sees a GPU.
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

  for name in ('check_cudnn_version', 'check_compute_capability'):
    assert hasattr(cudnn_attention, name), (
      f'JAX no longer has {name}: update this stand-in for its cuDNN checks.'
    )
  monkeypatch.setattr(cudnn_attention, 'check_cudnn_version', lambda: 91000)
  monkeypatch.setattr(
    cudnn_attention, 'check_compute_capability', lambda _: True
  )
  monkeypatch.setattr(attention, 'nvidia_compute_capability', lambda: (9, 0))
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')


def _cuda_custom_calls(fn, *args) -> set[str]:
  """The custom calls of `fn` lowered for CUDA (nothing is compiled)."""
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',))
  return set(re.findall(r'custom_call @([^(]+)\(', lowered.as_text()))


@pytest.mark.parametrize('classifier', ['token', 'map'])
def test_training_step_lowers_for_cuda_with_fused_attention(
  as_on_a_hopper_gpu, classifier
):
  # 16 patches and a class token: an odd sequence, as at every resolution;
  # the MAP head's probe is a single query.
  images = jnp.zeros((2, 16, 16, 3))
  model = tiny_vit(dtype='bfloat16', classifier=classifier)
  assert model.resolved_attention()[0] == 'cudnn'
  params = init_params(model, images)

  def loss(p):
    logits = model.apply({'params': p}, images)
    return jnp.sum(logits.astype(jnp.float32) ** 2)

  calls = _cuda_custom_calls(jax.value_and_grad(loss), params)
  # cuDNN's forward and backward kernels and nothing for a CPU.
  assert calls == {'__cudnn$fmhaSoftmax', '__cudnn$fmhaSoftmaxBackward'}


@pytest.mark.parametrize('length, heads, head_dim', SIZES)
def test_unpadded_cudnn_training_refuses_odd_lengths(
  as_on_a_hopper_gpu, length, heads, head_dim
):
  """Why the padding: JAX's own check, and the padded call passing it."""
  q, k, v, _ = _inputs(length, heads, head_dim, jnp.bfloat16, batch=1)

  def grads(fn):
    return jax.grad(
      lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2)
    )

  raw = functools.partial(jax.nn.dot_product_attention, implementation='cudnn')
  if length % 2:
    with pytest.raises(NotImplementedError, match='sequence length'):
      _cuda_custom_calls(grads(raw), q, k, v)
  else:
    assert '__cudnn$fmhaSoftmaxBackward' in _cuda_custom_calls(
      grads(raw), q, k, v
    )
  assert '__cudnn$fmhaSoftmaxBackward' in _cuda_custom_calls(
    grads(_attention('cudnn')), q, k, v
  )


def _lowered_training_step(step: str, platform: str) -> str:
  """The training loop's step of a tiny ViT over the 8 CPU devices, lowered.

  The CPU devices also on a GPU machine (JAX_PLATFORMS=cuda,cpu), so that the
  mesh, and what JAX's partitioning makes of cuDNN's calls, is the same.
  """
  config = benchmark_config.get_config('ViT-B_16')
  config.model.update(patch_size=4, dtype='bfloat16', **TINY_VIT)
  config.update(step=step, image_size=16, batch_size=8, num_classes=6)
  mesh = sharding.create_mesh(
    config.mesh.data, config.mesh.model, jax.devices('cpu')
  )
  model, description = objectives.model_from_config(config, config.num_classes)
  task = objectives.Task(
    model=model, loss_fn=steps.get_loss(config.loss), description=description
  )
  with sharding.activation_sharding(mesh, config.sharding):
    built = training.build_training(config, task, mesh, num_steps=10)
    batch = training.abstract_batch(config, config.num_classes, mesh)
    lowered = built.train_step.trace(built.layout.abstract, batch).lower(
      lowering_platforms=(platform,)
    )
  return lowered.as_text()


@pytest.mark.parametrize('step', ['jit', 'shard_map'])
def test_sharded_training_steps_lower_for_cuda(as_on_a_hopper_gpu, step):
  text = _lowered_training_step(step, 'cuda')
  calls = set(re.findall(r'custom_call @([^(]+)\(', text))
  if step == 'shard_map':  # Each device's own cuDNN calls.
    assert calls == {'__cudnn$fmhaSoftmax', '__cudnn$fmhaSoftmaxBackward'}
  else:  # JAX partitions cuDNN's calls over the mesh once compiled.
    assert calls == {'CustomSPMDPartitioning'}


@pytest.mark.parametrize('step', ['jit', 'shard_map'])
def test_sharded_training_steps_lower_for_tpus(monkeypatch, step):
  # Every `auto` choice as on a TPU: XLA's attention and products, the
  # convolution for the patch embedding, and no custom call.
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  monkeypatch.setattr(attention, 'nvidia_compute_capability', lambda: None)
  text = _lowered_training_step(step, 'tpu')
  assert not re.findall(r'custom_call @([^(]+)\(', text)
  assert 'stablehlo.convolution' in text

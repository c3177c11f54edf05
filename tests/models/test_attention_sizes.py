"""Attention at the paper's sizes against float64 numpy, on every backend.

XLA's and the project's product attention run everywhere; cuDNN's fused
attention (and the model with `attention='auto'`, which picks it) only where
an NVIDIA GPU is visible, and is skipped elsewhere (CI's CPUs). The test set-up
hides GPUs; on a GPU machine run

  JAX_PLATFORMS=cuda,cpu CUDA_VISIBLE_DEVICES=0 \
    python -m pytest tests/models/test_attention_sizes.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from helpers import init_params, random_images, randomize, tiny_vit
from vit_jax import checkpoints
from vit_jax.models import attention, common, patch_embedding

on_nvidia_gpu = attention.nvidia_compute_capability() is not None
needs_nvidia_gpu = pytest.mark.skipif(
  not on_nvidia_gpu, reason='needs an NVIDIA GPU (cuDNN)'
)
IMPLEMENTATIONS = [
  'xla',
  'product',
  pytest.param('cudnn', marks=needs_nvidia_gpu),
]
# (tokens, heads, head_dim): ViT-B/32 and B/16 at 224 px, B/16 at 384 px
# (the fine-tuning resolution), L/16 at 224 px.
SIZES = [(50, 12, 64), (197, 12, 64), (577, 12, 64), (197, 16, 64)]


def _inputs(length, heads, head_dim, dtype, batch=2, seed=0):
  """Query, key, value and an output cotangent, rounded to `dtype`."""
  rng = np.random.default_rng(seed)
  shape = (batch, length, heads, head_dim)
  return [
    jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(4)
  ]


def _reference(q, k, v, g):
  """Output and gradients of sum(out * g) in float64, (B, T, H, D) layout.

  With S = q k^T / sqrt(D), P = softmax(S), O = P v:
  dv = P^T g, dP = g v^T, dS = P * (dP - rowsum(dP * P)), dq = dS k / sqrt(D),
  dk = dS^T q / sqrt(D).
  """
  q, k, v, g = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (
    q, k, v, g))  # fmt: skip
  scale = q.shape[-1] ** -0.5
  p = ref.softmax(q @ k.swapaxes(-1, -2) * scale)
  out = p @ v
  dp = g @ v.swapaxes(-1, -2)
  ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
  grads = (
    ds @ k * scale,
    ds.swapaxes(-1, -2) @ q * scale,
    p.swapaxes(-1, -2) @ g,
  )
  return [x.transpose(0, 2, 1, 3) for x in (out, *grads)]


def _attention(implementation):
  if implementation == 'product':
    return attention.product_attention
  return lambda q, k, v: jax.nn.dot_product_attention(
    q, k, v, implementation=implementation
  )


def _relative_error(got, expected):
  """Largest error over the largest magnitude of the reference."""
  got = np.asarray(got, np.float64)
  return np.max(np.abs(got - expected)) / np.max(np.abs(expected))


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
@pytest.mark.parametrize('length, heads, head_dim', SIZES)
def test_bfloat16_attention_and_gradients_match_float64(
  implementation, length, heads, head_dim
):
  q, k, v, g = _inputs(length, heads, head_dim, jnp.bfloat16)
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


@pytest.mark.parametrize('implementation', ['xla', 'product'])
def test_float32_attention_matches_float64(implementation):
  q, k, v, g = _inputs(197, 12, 64, jnp.float32)
  out = jax.jit(_attention(implementation))(q, k, v)
  expected = _reference(q, k, v, g)[0]
  # XLA on a GPU may run float32 products in TF32 (10 significant bits).
  tolerance = 2e-3 if jax.default_backend() == 'gpu' else 1e-5
  assert _relative_error(out, expected) < tolerance


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

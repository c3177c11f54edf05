"""The attention option: which implementation runs, and that they agree."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from helpers import TINY_VIT, init_params, random_images, randomize
from vit_jax import checkpoints, models
from vit_jax.models import attention


def tiny_model(**overrides):
  return models.get_model(
    'ViT-B_16', 6, patch_size=4, **{**TINY_VIT, **overrides}
  )


def test_auto_picks_product_for_bfloat16_and_xla_for_float32_on_cpu():
  assert jax.default_backend() == 'cpu'
  assert attention.resolve_implementation('auto', jnp.bfloat16, 64)[0] == (
    'product'
  )
  assert attention.resolve_implementation('auto', jnp.float32, 64)[0] == 'xla'


@pytest.mark.parametrize(
  'dtype, expected', [('bfloat16', 'product'), ('float32', 'xla')]
)
def test_model_logs_and_runs_what_auto_picked(caplog, dtype, expected):
  model = tiny_model(dtype=dtype)
  images = jnp.zeros((2, 16, 16, 3))
  with caplog.at_level(logging.INFO):
    jaxpr = str(jax.make_jaxpr(model.init)(jax.random.key(0), images))
  picked = [r.getMessage() for r in caplog.records if 'attention' in r.msg]
  assert len(picked) == 1, picked  # once per trace, not once per layer
  assert f"(attention='auto'): {expected} (" in picked[0]
  # product_attention is a custom_vjp; XLA's attention is plain primitives.
  assert ('product_attention' in jaxpr) == (expected == 'product')


def test_explicit_cudnn_on_cpu_is_a_clear_error():
  model = tiny_model(dtype='bfloat16', attention='cudnn')
  with pytest.raises(ValueError, match="attention='cudnn'") as e:
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  message = str(e.value)
  assert 'NVIDIA GPU' in message and "'xla'" in message and 'cpu' in message


def test_unknown_attention_is_an_error():
  model = tiny_model(attention='flash')
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
def test_xla_and_product_agree_with_each_other_and_numpy(classifier):
  images = random_images((2, 16, 16, 3))
  model = tiny_model(attention='xla', classifier=classifier)
  params = randomize(init_params(model, images))
  outputs = {
    name: jax.jit(model.clone(attention=name).apply)({'params': params}, images)
    for name in ('xla', 'product')
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
  np.testing.assert_allclose(
    outputs['xla'], outputs['product'], rtol=0, atol=1e-5
  )


def test_xla_and_product_gradients_agree():
  images = random_images((2, 16, 16, 3))
  model = tiny_model(attention='xla')
  params = randomize(init_params(model, images))

  def grads(name):
    def loss(p):
      out = model.clone(attention=name).apply({'params': p}, images)
      return jnp.sum(out**2)

    return jax.jit(jax.grad(loss))(params)

  for a, b in zip(
    jax.tree.leaves(grads('xla')),
    jax.tree.leaves(grads('product')),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

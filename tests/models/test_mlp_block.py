"""The MLP block's GELU is recomputed in the backward pass, not kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vit_jax.models import encoder


def kept_gelu(x, approximate):
  """Plain autodiff of the GELU: its tanh (or erf) is kept for the gradient."""
  return nn.gelu(x, approximate=approximate)


@pytest.mark.parametrize('approximate', [True, False])
def test_the_gelu_gradient_is_that_of_plain_autodiff_to_the_bit(approximate):
  x = jax.random.normal(jax.random.key(0), (4, 16, 128)) * 3
  weights = jax.random.normal(jax.random.key(1), x.shape)

  def loss(gelu, x):
    return jnp.sum(gelu(x, approximate) * weights)

  recomputed = jax.jit(jax.grad(lambda x: loss(encoder.gelu_recomputed, x)))
  kept = jax.jit(jax.grad(lambda x: loss(kept_gelu, x)))
  np.testing.assert_array_equal(recomputed(x), kept(x))


def block_gradients(dtype):
  """The MLP block's parameter gradients, jitted, and its compiled form."""
  block = encoder.MlpBlock(mlp_dim=128, dtype=dtype)
  x = jax.random.normal(jax.random.key(0), (4, 16, 32))
  variables = block.init(jax.random.key(1), x)

  def loss(variables):
    return jnp.sum(block.apply(variables, x) ** 2)

  grad = jax.jit(jax.grad(loss))
  return grad(variables), grad.lower(variables).compile()


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_the_block_trains_alike_and_keeps_less(monkeypatch, dtype):
  grads, compiled = block_gradients(dtype)
  monkeypatch.setattr(encoder, 'gelu_recomputed', kept_gelu)
  kept_grads, kept_compiled = block_gradients(dtype)

  jax.tree.map(np.testing.assert_array_equal, grads, kept_grads)
  # The kept tanh is a (4, 16, 128) float32 array of 32 KiB; how much of it
  # the step's peak saves depends on how XLA reuses the freed buffers.
  saved = (
    kept_compiled.memory_analysis().temp_size_in_bytes
    - compiled.memory_analysis().temp_size_in_bytes
  )
  assert saved > 0

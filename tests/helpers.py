"""Small models and random inputs shared by the tests."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vit_jax import data, models
from vit_jax.models import common

# main.py's flag for the session's compilation cache (see conftest.py).
COMPILATION_CACHE_FLAG = (
  f'--compilation_cache={os.environ["JAX_COMPILATION_CACHE_DIR"]}'
)

TINY_VIT = dict(hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2)

# main.py's overrides of configs/digits.py for a tiny ViT on 8x8 digits, fast
# enough to train many times; each test adds its steps and periods.
TINY_DIGITS = {
  'model.hidden_size': 32,
  'model.mlp_dim': 64,
  'model.num_heads': 2,
  'model.num_layers': 2,
  'image_size': 8,
  'batch_size': 32,
  'eval_batch_size': 64,
}


def small_data_config(**overrides):
  """The data keys for 8x8 images, plain resizing, small batches."""
  config = data.default_config()
  config.image_size = 8
  config.batch_size = 8
  config.eval_batch_size = 64
  config.pp.train_crop = 'resize'
  config.pp.flip = False
  config.update(overrides)
  return config


def write_png(path, value):
  """An 8x8 PNG of one grey value, its folders created."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def abstract_params(model, image_size, batch=1):
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(
    lambda x: nn.unbox(model.init(jax.random.key(0), x)), images
  )
  return variables['params']


def randomize(params, seed=0, scale=0.2):
  """Non-trivial weights: zero-initialised heads would hide errors."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32),
    params,
  )


def init_params(model, images):
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), images))['params']


def random_images(shape, seed=1):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1, maxval=1)


def needs_custom_calls(library: str):
  """Skips a test where `library`'s ('mkl' or 'onednn') custom calls fail.

  They fail where they cannot be built, and on any backend but the CPU.
  """
  problem = common.custom_call_problem(library)
  return pytest.mark.skipif(
    problem is not None, reason=f'{library} custom calls unavailable: {problem}'
  )


def random_operands(shape_a, shape_b, dtype, seed=0):
  """Two standard-normal arrays of `dtype`, for the products' tests."""
  rng = np.random.default_rng(seed)
  a = jnp.asarray(rng.standard_normal(shape_a), dtype)
  b = jnp.asarray(rng.standard_normal(shape_b), dtype)
  return a, b


def tiny_vit(**overrides):
  """A TINY_VIT ViT-B/16 with 4x4 patches and 6 classes, for 16x16 images."""
  return models.get_model(
    'ViT-B_16', 6, patch_size=4, **{**TINY_VIT, **overrides}
  )


def squared_output_gradients(model, params, images):
  """The gradient of sum(model(images)**2) with respect to `params`."""

  def loss(p):
    return jnp.sum(model.apply({'params': p}, images) ** 2)

  return jax.jit(jax.grad(loss))(params)

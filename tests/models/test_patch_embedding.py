"""The patch embedding as a product computes the convolution it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from vit_jax.models import patch_embedding
from vit_jax.models.patch_embedding import PatchEmbedding

# (images, patch size): a ViT's, sides not a multiple of the patch (the
# 'VALID' convolution drops the rest), and a hybrid's 1x1 on a feature map.
SHAPES = [((2, 32, 32, 3), 16), ((2, 30, 35, 5), 4), ((3, 7, 7, 8), 1)]


def embedding_and_variables(shape, patch, **kwargs):
  images = jax.random.uniform(jax.random.key(0), shape, minval=-1, maxval=1)
  module = PatchEmbedding(24, patch, **kwargs)
  variables = module.init(jax.random.key(1), images)
  # A bias that is not zero, so that adding it is checked too.
  bias = jax.random.normal(jax.random.key(2), (24,))
  variables = {'params': {**variables['params'], 'bias': bias}}
  return module, variables, images


@pytest.mark.parametrize('implementation', ['conv', 'product'])
@pytest.mark.parametrize('shape, patch', SHAPES)
def test_it_is_the_convolution_of_the_numpy_reference(
  implementation, shape, patch
):
  module, variables, images = embedding_and_variables(
    shape, patch, implementation=implementation
  )
  params = jax.tree.map(np.float64, variables['params'])
  expected = ref.conv2d(
    np.float64(images), params['kernel'], patch, ((0, 0), (0, 0))
  )
  expected += params['bias']
  np.testing.assert_allclose(
    module.apply(variables, images), expected, rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('shape, patch', SHAPES)
def test_product_and_convolution_agree_with_their_kernel_gradients(
  dtype, shape, patch
):
  def run(implementation):
    module, variables, images = embedding_and_variables(
      shape, patch, dtype=dtype, implementation=implementation
    )

    def loss(variables):
      out = module.apply(variables, images).astype(jnp.float32)
      return jnp.sum(jnp.sin(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
    return variables, out, grads

  conv_variables, conv_out, conv_grads = run('conv')
  variables, out, grads = run('product')
  # The same parameters from the same key: checkpoints and runs carry over.
  jax.tree.map(np.testing.assert_array_equal, variables, conv_variables)
  # Only the order of the float32 sums differs (then each is rounded to
  # `dtype`: at most one bfloat16 step apart).
  tolerance = 1e-5 if dtype == 'float32' else 2**-7
  np.testing.assert_allclose(out, conv_out, rtol=tolerance, atol=tolerance)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      a, b, rtol=tolerance, atol=tolerance * np.abs(b).max()
    ),
    grads,
    conv_grads,
  )


def test_patches_are_cut_row_major():
  images = np.arange(2 * 6 * 9 * 2, dtype=np.float32).reshape(2, 6, 9, 2)
  cut = np.asarray(patch_embedding.patches(jnp.asarray(images), 3))
  assert cut.shape == (2, 6, 3, 3, 2)
  for row in range(2):
    for column in range(3):
      np.testing.assert_array_equal(
        cut[:, row * 3 + column],
        images[:, 3 * row : 3 * row + 3, 3 * column : 3 * column + 3],
      )


def test_auto_is_the_product_on_cpus_and_names_are_checked():
  assert jax.default_backend() == 'cpu'
  assert patch_embedding.resolve_implementation('auto') == 'product'
  assert patch_embedding.resolve_implementation('conv') == 'conv'
  with pytest.raises(ValueError, match=r"'im2col'.*'auto', 'conv', 'product'"):
    patch_embedding.resolve_implementation('im2col')

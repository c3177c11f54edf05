"""The patch embedding: non-overlapping patches times one matrix, plus a bias.

A convolution whose kernel and stride are the patch size, as in the paper's
code (flax's `nn.Conv` named 'embedding', kernel (p, p, channels, hidden)),
with the same parameters and initialisation. On CPUs it runs as the product
it is: the image cut into (batch, patches, p, p, channels) and contracted
with the kernel by XLA (`common.dot_general`; the `matmul` custom calls
were slower for this one product, whose input gradient is never needed).
XLA:CPU runs that convolution in float32 even for bfloat16 operands, and
its kernel gradient as a dilated convolution: for ViT-B/16 at batch 8 in
bfloat16 the forward pass and kernel gradient took 11.5 ms as a convolution
against 5.5 as a product (59 against 23 at batch 32), and the training step
ran 1.01-1.03x faster. Elsewhere it stays a convolution, which GPUs and
TPUs run without the patches' transpose.
"""

from typing import Any

import flax.linen as nn
import jax

from vit_jax.models import bias_gradients, common

IMPLEMENTATIONS = ('auto', 'conv', 'product')


def resolve_implementation(name: str) -> str:
  """'conv' or 'product' for an `IMPLEMENTATIONS` name ('auto': by backend)."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(
      f'Unknown patch embedding {name!r}; use one of {IMPLEMENTATIONS}.'
    )
  if name == 'auto':
    return 'product' if jax.default_backend() == 'cpu' else 'conv'
  return name


def patches(images: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) -> (B, H//size * W//size, size, size, C), row-major patches.

  Rows and columns past the last whole patch are dropped, as a 'VALID'
  convolution drops them.
  """
  batch, height, width, channels = images.shape
  rows, columns = height // size, width // size
  x = images[:, : rows * size, : columns * size]
  x = x.reshape(batch, rows, size, columns, size, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, rows * columns, size, size, channels)


class PatchEmbedding(nn.Module):
  """(B, H, W, C) images or feature maps -> (B, H//p, W//p, features) tokens.

  The output is in `dtype`: products accumulated in float32 and rounded,
  then the bias added, as flax's `nn.Conv` with that dtype does.
  """

  features: int
  patch_size: int
  dtype: str = 'float32'
  kernel_init: Any = nn.initializers.lecun_normal()
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x):
    dtype = common.compute_dtype(self.dtype)
    size = self.patch_size
    kernel = self.param(
      'kernel',
      self.kernel_init,
      (size, size, x.shape[-1], self.features),
    )
    bias = self.param(
      'bias',
      common.partitioned(nn.initializers.zeros, ('embed',)),
      (self.features,),
    )
    batch, height, width, _ = x.shape
    if resolve_implementation(self.implementation) == 'conv':
      y = (common.conv_general_dilated(dtype) or jax.lax.conv_general_dilated)(
        x.astype(dtype),
        kernel.astype(dtype),
        (size, size),
        'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      )
    else:
      dimension_numbers = (((2, 3, 4), (0, 1, 2)), ((), ()))
      y = (common.dot_general(dtype) or jax.lax.dot_general)(
        patches(x.astype(dtype), size),
        kernel.astype(dtype),
        dimension_numbers,
      )
      y = y.reshape(batch, height // size, width // size, self.features)
    return bias_gradients.add(y, bias)

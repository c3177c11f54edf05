"""Shapes of a model: its variables, its token grid, its trained resolution."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import sharding
from vit_jax.models.vit import VisionTransformer

# Where a ViT keeps its learned position embedding.
POSEMB = ('Transformer', 'posembed_input', 'pos_embedding')


def abstract_variables(
  model: nn.Module, height: int, width: int | None = None, boxed: bool = False
) -> dict[str, Any]:
  """`jax.eval_shape` of a model's params (and batch stats) at a resolution.

  Args:
    model: the Flax module.
    height: image height (and width, unless `width` is given).
    width: image width.
    boxed: keep the logical-axis boxes (for deriving shardings).
  """
  images = jax.ShapeDtypeStruct((1, height, width or height, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  # Attention modules also sow 'intermediates' at init; they are not state.
  variables = {
    k: v for k, v in variables.items() if k in ('params', 'batch_stats')
  }
  return variables if boxed else sharding.strip_boxes(variables)


def token_grid(
  model: VisionTransformer, height: int, width: int
) -> tuple[int, int, int]:
  """(rows, columns, stride in pixels) of a ViT's patch tokens.

  The stride is the pixel distance between neighbouring tokens' centres:
  the patch size for a patchify ViT, and the total downsampling of the stem
  times the patch size for hybrids (16 or 32) and ViTc (16).
  """
  if not isinstance(model, VisionTransformer):
    raise TypeError(
      f'{type(model).__name__} has no patch tokens; this needs a '
      'VisionTransformer (ViT, R50+ViT hybrid or ViTc).'
    )
  strides = []
  if model.resnet_stages is not None:
    # Root conv and max-pool, then every stage after the first.
    strides = [2, 2] + [2] * (len(model.resnet_stages) - 1)
  elif model.conv_stem is not None:
    strides = [stride for _, stride in model.conv_stem]
  # Every stem conv pads to ceil(size / stride).
  for stride in strides:
    height, width = -(-height // stride), -(-width // stride)
  patch = model.patch_size
  return height // patch, width // patch, math.prod(strides) * patch


def trained_image_size(model: nn.Module, params: dict[str, Any]) -> int | None:
  """The resolution of a square ViT's learned position embeddings, or None."""
  if not isinstance(model, VisionTransformer):
    return None
  try:
    posemb = params[POSEMB[0]][POSEMB[1]][POSEMB[2]]
  except KeyError:
    return None
  tokens = posemb.shape[1] - int('cls' in params)
  side = math.isqrt(tokens)
  if side * side != tokens:
    return None
  *_, stride = token_grid(model, 1, 1)
  return side * stride

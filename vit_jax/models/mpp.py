"""Masked patch prediction (App. B.1.2): a ViT that restores corrupted patches.

The model corrupts its own patch embeddings, drawing the corruption from the
RNG stream 'corruption' as dropout draws from 'dropout': of an image's N patch
embeddings, round(corrupt_rate * N) chosen uniformly are corrupted, and each
of those independently becomes the learnable [mask] embedding (probability
`mask_rate`), the embedding of another patch of the same image
(`random_rate`) or stays as it is (the rest). The class token and the encoder
are the ViT's; a linear head predicts from the encoder's output at every
patch position that patch's target (see `TARGETS`).

Parameters: the ViT's own, with the published names and layout (`embedding`,
`cls`, `Transformer/...`), plus the MPP-only ones in `MPP_ONLY_PARAMS`:
  mask_token       (1, 1, D) the [mask] embedding;
  mpp_head/kernel  (D, K) and mpp_head/bias (K,): the prediction head.
Without them (`vit_params`) the parameters are exactly those of
`get_model(name, num_classes=None)` with the same overrides, so the
checkpoint fine-tunes like any other.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import common, vit

MPP_ONLY_PARAMS = ('mask_token', 'mpp_head')

# What a patch's prediction is:
#   'mean_color'       its mean colour in 3 bits per channel (one 512-way
#                      classification; the objective the paper reports);
#   'downsized_color'  the patch averaged down to 4x4 in 3-bit colour (16
#                      parallel 512-way classifications);
#   'pixels'           its P x P x 3 values (regression).
TARGETS = ('mean_color', 'downsized_color', 'pixels')
COLOR_BITS = 3
NUM_COLORS = 2 ** (3 * COLOR_BITS)
DOWNSIZED = 4

# Corruption of each patch embedding.
NONE, MASK, RANDOM, UNCHANGED = 0, 1, 2, 3

CORRUPTION_RNG = 'corruption'


class Corruption(NamedTuple):
  """How each patch embedding of a batch is corrupted.

  Attributes:
    kind: int32 (B, N): NONE, MASK, RANDOM or UNCHANGED.
    source: int32 (B, N): the patch whose embedding stands at each position;
      another patch of the same image where kind is RANDOM, the position
      itself elsewhere.
  """

  kind: jax.Array
  source: jax.Array

  @property
  def corrupted(self) -> jax.Array:
    return self.kind != NONE


def draw_corruption(
  rng: jax.Array,
  shape: tuple[int, int],
  corrupt_rate: float,
  mask_rate: float,
  random_rate: float,
) -> Corruption:
  """Draws the corruption of a (batch, patches) grid of embeddings."""
  num_patches = shape[1]
  choose_rng, kind_rng, source_rng = jax.random.split(rng, 3)
  # Ranks of i.i.d. scores are a uniform permutation: the positions ranked
  # below `count` are a uniform subset of exactly `count` patches.
  count = round(corrupt_rate * num_patches)
  scores = jax.random.uniform(choose_rng, shape)
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  u = jax.random.uniform(kind_rng, shape)
  kind = jnp.where(
    u < mask_rate,
    MASK,
    jnp.where(u < mask_rate + random_rate, RANDOM, UNCHANGED),
  )
  kind = jnp.where(ranks < count, kind, NONE)
  # A uniform offset in [1, N) picks a uniform patch other than this one.
  position = jnp.arange(num_patches)
  offset = jax.random.randint(source_rng, shape, 1, num_patches)
  other = (position + offset) % num_patches
  source = jnp.where(kind == RANDOM, other, position)
  return Corruption(kind.astype(jnp.int32), source.astype(jnp.int32))


def corrupt(
  tokens: jax.Array, mask_token: jax.Array, corruption: Corruption
) -> jax.Array:
  """Applies `corruption` to patch embeddings (B, N, D)."""
  moved = jnp.take_along_axis(tokens, corruption.source[..., None], axis=1)
  mask = jnp.broadcast_to(mask_token.astype(tokens.dtype), tokens.shape)
  return jnp.where((corruption.kind == MASK)[..., None], mask, moved)


def prediction_shape(target: str, patch_pixels: int) -> tuple[int, ...]:
  """Shape of one patch's prediction for a target and a P x P patch."""
  if target == 'mean_color':
    return (NUM_COLORS,)
  if target == 'downsized_color':
    return (DOWNSIZED * DOWNSIZED, NUM_COLORS)
  if target == 'pixels':
    return (patch_pixels * patch_pixels * 3,)
  raise ValueError(f'Unknown MPP target {target!r}; use one of {TARGETS}.')


class MaskedPatchPredictor(vit.VisionTransformer):
  """A ViT with a [mask] embedding and a per-patch prediction head.

  `num_classes` is unused (there is no class head). Call it as a ViT;
  it returns {'predictions': (B, N, *prediction_shape), 'corrupted': bool
  (B, N)} and needs an RNG for the 'corruption' stream (in training and
  evaluation alike).

  Attributes:
    target: one of `TARGETS`.
    corrupt_rate: fraction of the patches corrupted.
    mask_rate: probability that a corrupted patch becomes [mask].
    random_rate: probability that it becomes another patch; it is left as it
      is otherwise.
  """

  target: str = 'mean_color'
  corrupt_rate: float = 0.5
  mask_rate: float = 0.8
  random_rate: float = 0.1

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check()
    implementation = self._attention()
    tokens, grid = self._tokens(images, train)
    batch, num_patches, width = tokens.shape
    # The pixels behind one token; also right for the hybrids' and ViTc's
    # stems, whose tokens tile the image just the same.
    patch_pixels = math.isqrt(images.shape[1] * images.shape[2] // num_patches)
    out_shape = prediction_shape(self.target, patch_pixels)
    corruption = draw_corruption(
      self.make_rng(CORRUPTION_RNG),
      (batch, num_patches),
      self.corrupt_rate,
      self.mask_rate,
      self.random_rate,
    )
    mask_token = self.param(
      'mask_token',
      common.partitioned(
        nn.initializers.normal(stddev=0.02), (None, None, 'embed')
      ),
      (1, 1, width),
    )
    x = self._encode(
      corrupt(tokens, mask_token, corruption), grid, train, implementation
    )
    # Drops the class token: one output per patch.
    x = x[:, x.shape[1] - num_patches :]
    predictions = nn.Dense(
      math.prod(out_shape),
      kernel_init=common.partitioned(
        nn.initializers.zeros, ('embed', 'classes')
      ),
      bias_init=common.partitioned(nn.initializers.zeros, ('classes',)),
      name='mpp_head',
    )(x)
    return {
      'predictions': predictions.reshape(batch, num_patches, *out_shape),
      'corrupted': corruption.corrupted,
    }


def from_vit(model: nn.Module, **settings) -> MaskedPatchPredictor:
  """The MPP model with the architecture of a registry ViT.

  Args:
    model: a `VisionTransformer` (ViT, R50+ViT or ViTc) from `get_model`.
    **settings: `MaskedPatchPredictor`'s own attributes (target, rates).

  Returns:
    The MPP model, whose encoder parameters are named as `model`'s.
  """
  if type(model) is not vit.VisionTransformer:
    raise ValueError(
      f'Masked patch prediction needs a ViT, not a {type(model).__name__}.'
    )
  fields = {
    f.name: getattr(model, f.name)
    for f in dataclasses.fields(vit.VisionTransformer)
    if f.init and f.name not in ('parent', 'name')
  }
  return MaskedPatchPredictor(**fields, **settings)


def vit_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """The ViT's parameters of an MPP parameter tree (MPP-only ones dropped)."""
  return {k: v for k, v in params.items() if k not in MPP_ONLY_PARAMS}

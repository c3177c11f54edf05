"""Attention maps of a Vision Transformer: weights, distances, rollout.

Attention weights are read from the 'intermediates' the attention modules
sow when the model is applied with `mutable=['intermediates']`; unrolled and
scanned (`scan=True`) encoders both work. The figures of these are in
`inspection`.
"""

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import VisionTransformer
from vit_jax.models.shapes import token_grid

_BLOCK = re.compile(r'^encoderblock(?:_(\d+))?$')


def _has_class_token(model: VisionTransformer) -> bool:
  return model.classifier in ('token', 'token_unpooled')


@functools.lru_cache(maxsize=8)
def _attention_fn(model: VisionTransformer):
  """A jitted (variables, images) -> stacked attention weights.

  Cached per model (modules compare by their attributes), so that repeated
  calls reuse the compiled function.
  """

  def weights(variables, images):
    variables = {k: v for k, v in variables.items() if k != 'intermediates'}
    _, state = model.apply(variables, images, mutable=['intermediates'])
    encoder = state['intermediates']['Transformer']
    layers = {}
    for name, block in encoder.items():
      match = _BLOCK.match(name)
      if not match:
        continue
      (sown,) = block['MultiHeadDotProductAttention_1']['attention_weights']
      if match.group(1) is None:  # scanned: a leading layer axis already
        return sown
      layers[int(match.group(1))] = sown
    return jnp.stack([layers[i] for i in sorted(layers)])

  return jax.jit(weights)


def attention_weights(
  model: VisionTransformer, variables: Any, images: Any
) -> np.ndarray:
  """Every layer's attention weights, (layers, batch, heads, tokens, tokens).

  Tokens are in the model's order: the class token first (if any), then the
  patches row by row.
  """
  return np.asarray(_attention_fn(model)(variables, images))


def _map_chunks(fn, images, batch_size: int) -> list[Any]:
  """fn(chunk) for consecutive chunks of `batch_size` images."""
  return [
    fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)
  ]


def _patch_distances(rows: int, cols: int, stride: int) -> np.ndarray:
  """Pixel distances between the centres of a grid's patches."""
  r, c = np.divmod(np.arange(rows * cols), cols)
  centres = np.stack([r, c], axis=1) * float(stride)
  return np.linalg.norm(centres[:, None] - centres[None], axis=-1)


def mean_attention_distance(
  model: VisionTransformer, variables: Any, images: Any, batch_size: int = 16
) -> np.ndarray:
  """Mean attention distance in pixels, per layer and head.

  For query patch q: Σ_k A[q, k]·‖pos_q - pos_k‖ over the key patches k,
  with positions the patch centres in pixels (`token_grid`'s stride apart);
  then averaged over query patches and images.

  The class token has no position. Its query row is left out of the
  average, and its key column out of the sum without renormalising the
  rest: attention paid to the class token counts as distance 0. (Models
  without a class token are unaffected.)

  Args:
    model: the VisionTransformer module.
    variables: its variables.
    images: (batch, height, width, 3) images in [-1, 1].
    batch_size: images per forward pass (bounds the memory of the
      attention maps, layers x batch x heads x tokens²).

  Returns:
    (layers, heads) float64 distances.
  """
  rows, cols, stride = token_grid(model, *images.shape[1:3])
  distances = _patch_distances(rows, cols, stride)
  skip = int(_has_class_token(model))

  attention = _attention_fn(model)

  def chunk_distance(chunk):
    weights = np.asarray(attention(variables, chunk))
    _check_tokens(weights, rows * cols + skip)
    patches = weights[..., skip:, skip:].astype(np.float64)
    per_query = np.einsum('lbhqk,qk->lbhq', patches, distances)
    # Summed over the chunk's images, each averaged over its queries.
    return per_query.mean(axis=3).sum(axis=1)

  return sum(_map_chunks(chunk_distance, images, batch_size)) / len(images)


def _check_tokens(weights: np.ndarray, expected: int) -> None:
  if weights.shape[-1] != expected:
    raise ValueError(
      f'The attention maps have {weights.shape[-1]} tokens, but the token '
      f'grid and classifier give {expected}; the model does not match the '
      'variables or images.'
    )


def attention_rollout(attentions: Any) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema, 2020) in float64.

  Args:
    attentions: (layers, ..., heads, tokens, tokens) attention weights,
      first layer first (as `attention_weights` returns them).

  Returns:
    (..., tokens, tokens): R = Ã_L ⋯ Ã_1 with Ã = rownorm(0.5·mean_heads(A)
    + 0.5·I), the identity accounting for the residual connections.
  """
  attentions = np.asarray(attentions, np.float64)
  tokens = attentions.shape[-1]
  identity = np.eye(tokens)
  rollout = np.broadcast_to(identity, attentions.shape[1:-3] + identity.shape)
  for layer in attentions:
    mixed = 0.5 * layer.mean(axis=-3) + 0.5 * identity
    mixed /= mixed.sum(axis=-1, keepdims=True)
    rollout = mixed @ rollout
  return rollout


def rollout_maps(
  model: VisionTransformer, variables: Any, images: Any, batch_size: int = 16
) -> np.ndarray:
  """The class token's rolled-out attention to the patches, (batch, g, g).

  Row R[cls, patches] of `attention_rollout`, on the token grid.
  """
  if not _has_class_token(model):
    raise ValueError(
      f'Attention rollout reads the class token, but classifier='
      f'{model.classifier!r} has none; use a token-classifier model.'
    )
  rows, cols, _ = token_grid(model, *images.shape[1:3])

  attention = _attention_fn(model)

  def chunk_maps(chunk):
    weights = np.asarray(attention(variables, chunk))
    _check_tokens(weights, rows * cols + 1)
    return attention_rollout(weights)[:, 0, 1:].reshape(-1, rows, cols)

  return np.concatenate(_map_chunks(chunk_maps, images, batch_size))

"""Inspecting a Vision Transformer: the paper's Figs. 6, 7 and 11.

- `embedding_filters_figure`: principal components of the patch-embedding
  filters (Fig. 7 left).
- `position_similarity_figure`: cosine similarity between position
  embeddings (Fig. 7 centre).
- `attention_distance_figure`: how far each head looks, by depth (Fig. 7
  right, Fig. 11), from `attention_maps.mean_attention_distance`.
- `rollout_figure`: what the class token attends to through all layers
  (Figs. 6 and 14), from `attention_maps.rollout_maps`.

Figures are PNG files written with matplotlib's Agg renderer (no display
needed).
"""

import io
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath
from matplotlib import colormaps
from matplotlib.figure import Figure

# ----------------------------------------------------------------------------
# Helpers.


def _params(params: Mapping[str, Any]) -> Mapping[str, Any]:
  """Accepts a parameter tree or variables ({'params': ...}), boxed or not."""
  params = nn.meta.unbox(params)
  return params.get('params', params)


def _save(fig: Figure, path) -> None:
  """Writes a figure as PNG (any etils path: local or cloud)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120, bbox_inches='tight')
  path.write_bytes(buffer.getvalue())


# ----------------------------------------------------------------------------
# Patch-embedding filters (Fig. 7 left).


def embedding_filters_figure(
  params: Mapping[str, Any], path, num_components: int = 28
) -> np.ndarray:
  """Draws the top principal components of the patch-embedding filters.

  The D filters of `embedding/kernel` (P, P, 3, D), each a vector of P·P·3
  pixel weights, are centred and decomposed by SVD; the top components are
  drawn as RGB tiles, each stretched to [0, 1] for display.

  Args:
    params: a ViT's parameters (or variables).
    path: the PNG file to write.
    num_components: how many components to draw (28 in the paper).

  Returns:
    The components, (num_components, P, P, 3), unit norm.
  """
  kernel = np.asarray(_params(params)['embedding']['kernel'], np.float64)
  patch, _, channels, hidden = kernel.shape
  if patch == 1 or channels != 3:
    raise ValueError(
      f'embedding/kernel has shape {kernel.shape}: a 1x1 embedding of a '
      'feature map (an R50+ViT hybrid or a ViTc conv stem), which has no '
      'filters in pixel space. Use a patchify ViT (e.g. ViT-L_32).'
    )
  filters = kernel.reshape(-1, hidden).T  # (D, P·P·3)
  if not 0 < num_components <= min(filters.shape):
    raise ValueError(
      f'num_components={num_components}; the {hidden} filters of length '
      f'{filters.shape[1]} have at most {min(filters.shape)} components.'
    )
  centred = filters - filters.mean(axis=0)
  _, singular, vt = np.linalg.svd(centred, full_matrices=False)
  explained = singular**2 / np.sum(singular**2)
  components = vt[:num_components].reshape(-1, patch, patch, 3)

  cols = min(7, num_components)
  rows = -(-num_components // cols)
  fig = Figure(figsize=(1.3 * cols, 1.45 * rows + 0.6))
  fig.suptitle(
    f'Top {num_components} principal components of the {patch}x{patch} RGB '
    'patch-embedding filters\n(each tile: one component, stretched to the '
    'full colour range; % = variance explained)'
  )
  for i in range(rows * cols):
    ax = fig.add_subplot(rows, cols, i + 1)
    ax.axis('off')
    if i < num_components:
      tile = components[i]
      tile = (tile - tile.min()) / max(np.ptp(tile), 1e-12)
      ax.imshow(tile, interpolation='nearest')
      ax.set_title(f'PC {i + 1} ({explained[i]:.0%})', fontsize=8)
  _save(fig, path)
  return components


# ----------------------------------------------------------------------------
# Position-embedding similarity (Fig. 7 centre).


def position_similarity(
  params: Mapping[str, Any], has_class_token: bool
) -> np.ndarray:
  """Cosine similarity of every patch's position embedding with every
  other's, as (g, g, g, g): [row, col] of the patch, then the map."""
  posemb = np.asarray(
    _params(params)['Transformer']['posembed_input']['pos_embedding'],
    np.float64,
  )[0]
  if has_class_token:
    posemb = posemb[1:]
  grid = math.isqrt(len(posemb))
  if grid * grid != len(posemb):
    extra = ' minus the class token' if has_class_token else ''
    raise ValueError(
      f'{len(posemb)} position embeddings{extra} do not form a square grid; '
      'check has_class_token (True for the token classifier).'
    )
  unit = posemb / np.linalg.norm(posemb, axis=1, keepdims=True)
  return (unit @ unit.T).reshape(grid, grid, grid, grid)


def position_similarity_figure(
  params: Mapping[str, Any], path, has_class_token: bool
) -> np.ndarray:
  """Draws `position_similarity` as a grid of grids (Fig. 7 centre).

  Tile (r, c) is the g x g map of cosine similarities between the position
  embedding of the patch at row r, column c and those of all patches.

  Returns:
    The (g, g, g, g) similarities.
  """
  similarity = position_similarity(params, has_class_token)
  grid = similarity.shape[0]
  # One image: g x g tiles of g x g pixels, one blank pixel between tiles.
  step = grid + 1
  mosaic = np.full((grid * step - 1, grid * step - 1), np.nan)
  for r in range(grid):
    for c in range(grid):
      mosaic[r * step : r * step + grid, c * step : c * step + grid] = (
        similarity[r, c]
      )
  fig = Figure(figsize=(7, 6))
  ax = fig.add_subplot()
  image = ax.imshow(mosaic, cmap='viridis', vmin=-1, vmax=1)
  ticks = np.arange(grid) * step + (grid - 1) / 2
  every = max(1, grid // 12)
  ax.set_xticks(ticks[::every], [str(i + 1) for i in range(grid)][::every])
  ax.set_yticks(ticks[::every], [str(i + 1) for i in range(grid)][::every])
  ax.tick_params(length=0)
  ax.set_xlabel('Input patch column')
  ax.set_ylabel('Input patch row')
  ax.set_title('Position embedding similarity')
  for spine in ax.spines.values():
    spine.set_visible(False)
  fig.colorbar(image, ax=ax, label='Cosine similarity')
  _save(fig, path)
  return similarity


# ----------------------------------------------------------------------------
# Mean attention distance (Fig. 7 right, Fig. 11).


def attention_distance_figure(distances: np.ndarray, path) -> None:
  """Mean attention distance against depth, one dot per head (Fig. 11)."""
  distances = np.asarray(distances)
  layers, heads = distances.shape
  fig = Figure(figsize=(6, 4.5))
  ax = fig.add_subplot()
  colours = _colours(heads)
  for head in range(heads):
    ax.scatter(
      np.arange(1, layers + 1),
      distances[:, head],
      s=14,
      color=colours[head],
      label=f'Head {head + 1}',
    )
  ax.set_xlabel('Network depth (layer)')
  ax.set_ylabel('Mean attention distance (pixels)')
  ax.set_title('Mean attention distance per head')
  ax.set_xticks(np.arange(1, layers + 1, max(1, layers // 16)))
  ax.set_ylim(0, 1.08 * max(float(distances.max()), 1e-6))
  ax.grid(alpha=0.3)
  if heads <= 16:
    ax.legend(
      fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5), frameon=False
    )
  _save(fig, path)


def _colours(count: int):
  cmap = colormaps['viridis']
  return [cmap(i / max(count - 1, 1)) for i in range(count)]


# ----------------------------------------------------------------------------
# Attention rollout (Figs. 6 and 14).


def rollout_figure(images: Any, maps: np.ndarray, path) -> None:
  """Each image above its rollout map, upsampled bilinearly and overlaid.

  Args:
    images: (batch, height, width, 3) in [-1, 1].
    maps: (batch, g, g) from `rollout_maps`; each is stretched to [0, 1].
    path: the PNG file to write.
  """
  images = np.asarray(images, np.float32)
  maps = np.asarray(maps, np.float32)
  if len(images) != len(maps):
    raise ValueError(f'{len(images)} images but {len(maps)} maps.')
  count, height, width, _ = images.shape
  upsampled = np.asarray(
    jax.image.resize(maps, (count, height, width), 'bilinear')
  )
  fig = Figure(figsize=(2 * count + 1, 4.4), layout='constrained')
  fig.suptitle('Attention rollout: class token to image patches')
  for i in range(count):
    shown = np.clip((images[i] + 1) / 2, 0, 1)
    heat = upsampled[i] - upsampled[i].min()
    heat /= max(float(heat.max()), 1e-12)
    top = fig.add_subplot(2, count, i + 1)
    top.imshow(shown)
    top.set_title(f'Image {i + 1}', fontsize=9)
    bottom = fig.add_subplot(2, count, count + i + 1)
    bottom.imshow(shown)
    overlay = bottom.imshow(heat, cmap='jet', alpha=0.5, vmin=0, vmax=1)
    for ax in (top, bottom):
      ax.set_xticks([])
      ax.set_yticks([])
    if i == 0:
      top.set_ylabel('Input')
      bottom.set_ylabel('Rollout overlay')
  fig.colorbar(
    overlay,
    ax=fig.axes,
    shrink=0.5,
    label='Attention (relative to the image max)',
  )
  _save(fig, path)

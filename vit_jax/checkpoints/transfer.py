"""Transfer of a pretrained checkpoint to a new task ("checkpoint surgery").

A checkpoint reaches a model through `transfer`; for fine-tuning (a new
task) that is four changes, all else must match exactly:
- the pretraining head is replaced by a zero-initialised head for the new
  classes (as in the paper's code);
- the representation layer (`pre_logits`) is kept or dropped as configured
  (the paper drops it: the "drop-head" variant);
- the position embeddings are resized to the new patch grid by bilinear
  interpolation with aligned corners (scipy.ndimage.zoom with order=1), the
  class-token slot kept apart;
- parameters that exist only for a pretraining objective (e.g. masked patch
  prediction's mask token and prediction head) are dropped.
Running a checkpoint as trained (evaluation, inspection) keeps the head and
representation layer and may still resize the position embeddings to a new
resolution.
"""

import math
from typing import Any

import numpy as np
from absl import logging

from vit_jax.checkpoints import tree
from vit_jax.models.mpp import MPP_ONLY_PARAMS
from vit_jax.models.shapes import POSEMB

PyTree = Any

HEAD = 'head'
REPRESENTATION = 'pre_logits'
# Top-level parameters that only a pretraining objective uses.
PRETRAINING_ONLY = MPP_ONLY_PARAMS


def _interpolation_matrix(old: int, new: int) -> np.ndarray:
  """(new, old) weights of linear interpolation with aligned corners."""
  if old == 1 or new == 1:
    weights = np.zeros((new, old))
    weights[:, 0] = 1.0
    return weights
  position = np.arange(new) * (old - 1) / (new - 1)
  low = np.minimum(np.floor(position).astype(int), old - 2)
  frac = position - low
  weights = np.zeros((new, old))
  weights[np.arange(new), low] = 1.0 - frac
  weights[np.arange(new), low + 1] = frac
  return weights


def resize_grid(grid: np.ndarray, new_shape: tuple[int, int]) -> np.ndarray:
  """(h, w, D) -> (H, W, D), bilinear with aligned corners.

  Equal to `scipy.ndimage.zoom(grid, (H / h, W / w, 1), order=1)`.
  """
  rows = _interpolation_matrix(grid.shape[0], new_shape[0])
  cols = _interpolation_matrix(grid.shape[1], new_shape[1])
  grid = np.asarray(grid, np.float64)
  return np.einsum('Hh,Ww,hwd->HWd', rows, cols, grid).astype(np.float32)


def resize_posemb(
  posemb: np.ndarray,
  new_grid: tuple[int, int],
  num_prefix_tokens: int,
  old_grid: tuple[int, int] | None = None,
) -> np.ndarray:
  """Resizes a (1, prefix + h*w, D) position embedding to a new patch grid.

  Args:
    posemb: the embedding; its first `num_prefix_tokens` rows (the class
      token's) are kept as they are.
    new_grid: the new (rows, cols) of patches.
    num_prefix_tokens: 1 with a class token, 0 without ('gap').
    old_grid: the old (rows, cols); inferred as square when not given.
  """
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  if old_grid is None:
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
      raise ValueError(
        f'Cannot infer the grid of {grid.shape[0]} position embeddings; '
        'pass old_grid.'
      )
    old_grid = (side, side)
  if old_grid[0] * old_grid[1] != grid.shape[0]:
    raise ValueError(
      f'old_grid {old_grid} does not hold {grid.shape[0]} embeddings.'
    )
  grid = grid.reshape(*old_grid, -1)
  resized = resize_grid(grid, new_grid).reshape(1, -1, grid.shape[-1])
  return np.concatenate([prefix, resized], axis=1).astype(np.float32)


def _get(node, path):
  for key in path:
    node = node[key]
  return node


def _set(node, path, value):
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = value


def _resize_posemb_to(params, target_params, grid) -> None:
  """Resizes `params`' position embedding in place to the target's length."""
  try:
    posemb = np.asarray(_get(params, POSEMB))
    wanted = _get(target_params, POSEMB)
  except KeyError:
    return  # No learned position embedding (BiT, or a fixed one).
  if posemb.shape == wanted.shape:
    return
  prefix = 1 if 'cls' in target_params else 0
  if grid is None:
    side = math.isqrt(wanted.shape[1] - prefix)
    grid = (side, side)
  logging.info(
    'Resizing the position embeddings from %d to %d tokens (grid %s).',
    posemb.shape[1],
    wanted.shape[1],
    grid,
  )
  _set(params, POSEMB, resize_posemb(posemb, grid, prefix))


def transfer(
  variables: dict[str, PyTree],
  target: dict[str, PyTree],
  *,
  keep_head: bool = False,
  grid: tuple[int, int] | None = None,
) -> dict[str, PyTree]:
  """Fits checkpoint variables to a model (its abstract `target` variables).

  Args:
    variables: {'params': ..., optionally 'batch_stats': ...} as a loader
      returns them.
    target: `jax.eval_shape` of the model's (unboxed) variables; it decides
      the head, whether `pre_logits` stays, the position-embedding grid,
      and the block layout (scanned or not).
    keep_head: keep the checkpoint's head and representation layer (to run
      the model as trained); otherwise the head is a new zero-initialised
      one and `pre_logits` stays only if the target has it (fine-tuning).
    grid: the new patch grid (rows, cols), when it is not square.

  Returns:
    Host variables shaped exactly like `target`.

  Raises:
    tree.CheckpointMismatchError: anything else differs; the error lists
      the missing, unexpected and mis-shaped keys.
  """
  params = tree.unflatten(tree.flatten(variables['params']))
  target_params = target['params']
  for key in PRETRAINING_ONLY:
    params.pop(key, None)
  if not keep_head:
    params.pop(HEAD, None)
    if HEAD in target_params:
      params[HEAD] = {
        name: np.zeros(leaf.shape, np.float32)
        for name, leaf in target_params[HEAD].items()
      }
    if REPRESENTATION not in target_params:
      params.pop(REPRESENTATION, None)
  _resize_posemb_to(params, target_params, grid)
  fitted = {'params': tree.fit_to_model(params, target_params)}
  if 'batch_stats' in target:
    fitted['batch_stats'] = tree.fit_to_model(
      variables.get('batch_stats', {}), target['batch_stats']
    )
  return fitted

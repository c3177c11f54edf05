"""Transfer of a pretrained checkpoint to a new task ("checkpoint surgery").

A pretrained model reaches a fine-tuning model through four changes, all
else must match exactly:
- the pretraining head is replaced by a zero-initialised head for the new
  classes (as in the paper's code);
- the representation layer (`pre_logits`) is kept or dropped as configured
  (the paper drops it: the "drop-head" variant);
- the position embeddings are resized to the new patch grid by bilinear
  interpolation with aligned corners (scipy.ndimage.zoom with order=1), the
  class-token slot kept apart;
- parameters that exist only for a pretraining objective (e.g. masked patch
  prediction's mask token and prediction head) are dropped.
"""

import math
from typing import Any

import numpy as np
from etils import epath

from vit_jax import checkpoints, train_checkpoints
from vit_jax.models import get_model

PyTree = Any

HEAD = 'head'
REPRESENTATION = 'pre_logits'
POSEMB = ('Transformer', 'posembed_input', 'pos_embedding')
# Top-level parameters used only by a pretraining objective.
PRETRAINING_ONLY = ('mask_token', 'mpp_head')


def load_checkpoint(
  path: str, ema: bool = False
) -> tuple[dict[str, PyTree], dict[str, Any] | None]:
  """Variables of a checkpoint, and its model description if it has one.

  Args:
    path: a published-layout .npz file (with an optional `<name>.json`
      description beside it, as this project's exports have), an orbax
      checkpoint directory, or a workdir holding `checkpoints/`.
    ema: read the Polyak-averaged weights of an orbax checkpoint.
  """
  path_ = epath.Path(path)
  if path_.is_dir():
    return train_checkpoints.load_variables(path_, ema=ema)
  if path_.suffix == '.npz' or path_.is_file():
    description_file = path_.with_suffix('.json')
    description = None
    if description_file.exists():
      description = checkpoints.read_description(description_file)
    return checkpoints.load_npz_variables(path_), description
  raise FileNotFoundError(
    f'{path} is neither a .npz file nor a checkpoint directory (or a workdir '
    'with checkpoints/).'
  )


# Model attributes that belong to a training run rather than to the
# architecture: a new run on a checkpoint sets its own.
TRAINING_ATTRIBUTES = (
  'dropout_rate',
  'attention_dropout_rate',
  'head_bias_init',
  'representation_size',
  'dtype',
  'scan',
  'remat_policy',
)


def architecture(description: dict[str, Any] | None) -> dict[str, Any]:
  """The architecture attributes of a checkpoint's model description."""
  if description is None:
    return {}
  return {
    key: value
    for key, value in description['overrides'].items()
    if key not in TRAINING_ATTRIBUTES
  }


def model_for_checkpoint(
  variables: dict[str, PyTree],
  description: dict[str, Any] | None,
  model_name: str | None = None,
  **overrides,
):
  """The model a checkpoint holds, with its own head.

  Args:
    variables: the checkpoint's variables (`load_checkpoint`).
    description: its model description, or None (a published .npz): then
      `model_name` and `overrides` give the architecture, and the head and
      representation sizes are read from the parameters.
    model_name: the registry name, when there is no description.
    **overrides: model attributes to set (e.g. dtype); with a description,
      only attributes that leave the architecture as it is.

  Returns:
    (model, the resolution it was trained at or None).
  """
  params = variables['params']
  if description is not None:
    if model_name and model_name != description['model_name']:
      raise ValueError(
        f'The checkpoint holds {description["model_name"]}, not {model_name}.'
      )
    attributes = {**description['overrides'], **overrides}
    model = get_model(
      description['model_name'], description['num_classes'], **attributes
    )
    return model, description.get('image_size')
  if not model_name:
    raise ValueError(
      'This checkpoint has no model description: set --config.model_name '
      '(and any architecture overrides in --config.model).'
    )
  head = params.get(HEAD)
  num_classes = int(head['kernel'].shape[-1]) if head else None
  representation = params.get(REPRESENTATION)
  if representation is not None:
    overrides['representation_size'] = int(representation['kernel'].shape[-1])
  return get_model(model_name, num_classes, **overrides), None


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


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def adapt(
  variables: dict[str, PyTree],
  target: dict[str, PyTree],
  grid: tuple[int, int] | None = None,
) -> dict[str, PyTree]:
  """Adapts pretrained variables to a model (its abstract `target` variables).

  Args:
    variables: {'params': ..., optionally 'batch_stats': ...} of the
      pretrained model, e.g. from `load_checkpoint`.
    target: `jax.eval_shape` of the new model's (unboxed) variables; it
      decides the head, whether `pre_logits` stays, the position-embedding
      grid, and the block layout (scanned or not).
    grid: the new patch grid (rows, cols), when it is not square.

  Returns:
    Host variables shaped exactly like `target`.

  Raises:
    checkpoints.CheckpointMismatchError: anything else differs; the error
      lists the missing, unexpected and mis-shaped keys.
  """
  params = checkpoints.unflatten(checkpoints.flatten(variables['params']))
  target_params = target['params']
  for key in PRETRAINING_ONLY:
    params.pop(key, None)
  # The new head, zero-initialised (and -- if the target has no head --
  # none at all).
  params.pop(HEAD, None)
  if HEAD in target_params:
    params[HEAD] = {
      name: np.zeros(leaf.shape, np.float32)
      for name, leaf in target_params[HEAD].items()
    }
  if REPRESENTATION not in target_params:
    params.pop(REPRESENTATION, None)
  try:
    posemb = _get(params, POSEMB)
    target_posemb = _get(target_params, POSEMB)
  except KeyError:
    posemb = target_posemb = None  # Not a ViT (BiT).
  if posemb is not None and posemb.shape != target_posemb.shape:
    prefix = 1 if 'cls' in target_params else 0
    tokens = target_posemb.shape[1] - prefix
    if grid is None:
      side = math.isqrt(tokens)
      grid = (side, side)
    _set(params, POSEMB, resize_posemb(np.asarray(posemb), grid, prefix))
  adapted = {'params': checkpoints.fit_to_model(params, target_params)}
  if 'batch_stats' in target:
    adapted['batch_stats'] = checkpoints.fit_to_model(
      variables.get('batch_stats', {}), target['batch_stats']
    )
  return adapted

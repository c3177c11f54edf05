"""Parameter trees: flat '/'-joined keys, encoder-block layouts, fitting.

Every weight layout reads into, and writes from, this project's parameter
tree. Two conversions are shared by all of them:
- block numbering: the published files use the global numbering inside an
  encoder block (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
  MlpBlock_3); trees from newer Flax code use per-type numbering
  (LayerNorm_1, MultiHeadDotProductAttention_0, MlpBlock_0). Reading accepts
  both, writing uses the global one.
- scanned blocks: a model built with `scan=True` stacks every block under
  `Transformer/encoderblock/`; files hold one `encoderblock_{i}` per block.
  `fit_to_model` converts either way.
"""

import re
from collections.abc import Mapping
from typing import Any

import flax
import numpy as np

_BLOCK = re.compile(r'^(Transformer/encoderblock(?:_\d+)?)/([A-Za-z]+)_(\d+)/')
# Per-type numbering inside a block -> the published global numbering.
_PER_TYPE_TO_GLOBAL = {
  ('LayerNorm', '0'): 'LayerNorm_0',
  ('MultiHeadDotProductAttention', '0'): 'MultiHeadDotProductAttention_1',
  ('LayerNorm', '1'): 'LayerNorm_2',
  ('MlpBlock', '0'): 'MlpBlock_3',
}
_SCANNED = 'Transformer/encoderblock/'
_UNROLLED = re.compile(r'^Transformer/encoderblock_(\d+)/(.*)$')


class CheckpointMismatchError(ValueError):
  """A parameter tree does not fit the model it is loaded into."""


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  return {
    '/'.join(path): value
    for path, value in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(tree)
    ).items()
  }


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}."""
  return flax.traverse_util.unflatten_dict(
    {tuple(key.split('/')): value for key, value in flat.items()}
  )


def global_block_numbering(flat: dict[str, Any]) -> dict[str, Any]:
  """Renames per-type numbered block submodules to the published names."""
  per_type = any(
    (m := _BLOCK.match(key)) and m.group(2) == 'MlpBlock' and m.group(3) == '0'
    for key in flat
  )
  if not per_type:
    return flat
  renamed = {}
  for key, value in flat.items():
    m = _BLOCK.match(key)
    if m and (m.group(2), m.group(3)) in _PER_TYPE_TO_GLOBAL:
      new = _PER_TYPE_TO_GLOBAL[m.group(2), m.group(3)]
      key = f'{m.group(1)}/{new}/{key[m.end() :]}'
    renamed[key] = value
  return renamed


def unstack_blocks(flat: dict[str, Any]) -> dict[str, Any]:
  """Scanned `encoderblock/x` (L, ...) -> `encoderblock_{i}/x` per block."""
  out = {}
  for key, value in flat.items():
    if key.startswith(_SCANNED):
      rest = key[len(_SCANNED) :]
      for i in range(value.shape[0]):
        out[f'Transformer/encoderblock_{i}/{rest}'] = value[i]
    else:
      out[key] = value
  return out


def stack_blocks(flat: dict[str, Any]) -> dict[str, Any]:
  """Per-block `encoderblock_{i}/x` -> scanned `encoderblock/x` (L, ...)."""
  blocks: dict[str, dict[int, Any]] = {}
  out = {}
  for key, value in flat.items():
    m = _UNROLLED.match(key)
    if m:
      blocks.setdefault(m.group(2), {})[int(m.group(1))] = value
    else:
      out[key] = value
  for rest, per_block in blocks.items():
    if sorted(per_block) != list(range(len(per_block))):
      raise CheckpointMismatchError(
        f'Cannot stack encoder blocks: {rest!r} exists for blocks '
        f'{sorted(per_block)}, not for every block 0..{len(per_block) - 1}.'
      )
    out[_SCANNED + rest] = np.stack(
      [np.asarray(per_block[i]) for i in range(len(per_block))]
    )
  return out


def describe_mismatch(
  flat: Mapping[str, Any], target: Mapping[str, Any], limit: int = 30
) -> str | None:
  """Lists missing, unexpected and mis-shaped keys; None when they fit."""
  missing = sorted(set(target) - set(flat))
  unexpected = sorted(set(flat) - set(target))
  misshaped = sorted(
    f'{key}: checkpoint {tuple(np.shape(flat[key]))}, model '
    f'{tuple(target[key].shape)}'
    for key in set(flat) & set(target)
    if tuple(np.shape(flat[key])) != tuple(target[key].shape)
  )
  if not (missing or unexpected or misshaped):
    return None

  def section(title, items):
    if not items:
      return ''
    more = (
      f'\n    ... and {len(items) - limit} more' if len(items) > limit else ''
    )
    return (
      f'\n  {title} ({len(items)}):\n    ' + '\n    '.join(items[:limit]) + more
    )

  return (
    section('missing from the checkpoint', missing)
    + section('unexpected in the checkpoint', unexpected)
    + section('shape mismatch', misshaped)
  )


def fit_to_model(params: Mapping[str, Any], target: Mapping[str, Any]) -> dict:
  """Converts `params` to the layout of `target` and checks that it fits.

  Args:
    params: a parameter tree, e.g. from `load_npz` or an orbax checkpoint.
    target: the model's parameter tree or its shapes (`jax.eval_shape`).

  Returns:
    `params` with the block layout (scanned or unrolled) and numbering of
    `target`, as numpy arrays.

  Raises:
    CheckpointMismatchError: listing the missing, unexpected and mis-shaped
      keys; nothing is loaded partially.
  """
  flat = unstack_blocks(global_block_numbering(flatten(params)))
  target_flat = flatten(target)
  if any(key.startswith(_SCANNED) for key in target_flat):
    flat = stack_blocks(flat)
  problem = describe_mismatch(flat, target_flat)
  if problem:
    raise CheckpointMismatchError(
      f'The checkpoint does not fit the model:{problem}'
    )
  return unflatten({k: np.asarray(v) for k, v in flat.items()})

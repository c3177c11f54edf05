"""Published-layout .npz checkpoints: read, write, and fit to a model.

The published ViT and R50+ViT checkpoints are flat `numpy.savez` archives
whose keys are Flax parameter paths joined with '/'. This project's module
names are those paths, so a parameter tree maps to the file one to one, with
three conversions:
- block numbering: files use the global numbering inside an encoder block
  (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3);
  trees from newer Flax code use per-type numbering (LayerNorm_1,
  MultiHeadDotProductAttention_0, MlpBlock_0). Reading accepts both, writing
  uses the global one.
- scanned blocks: a model built with `scan=True` stacks every block under
  `Transformer/encoderblock/`; files hold one `encoderblock_{i}` per block.
  `fit_to_model` converts either way.
- BiT: the BiT authors' files use a `resnet/` prefix, `gamma`/`beta` for
  GroupNorm and a 1x1 conv head (`head/conv2d`); they are translated on read
  and write.
Batch statistics (only the ViTc stem has any) are stored under a
`batch_stats/` prefix.
"""

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import numpy as np
from etils import epath

PyTree = Any

# Prefixes that wrap the parameters in known checkpoint files.
_PREFIXES = ('opt/target/', 'params/img/', 'params/', 'model/')
_BIT_PREFIX = 'resnet/'
_BATCH_STATS = 'batch_stats/'
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


# ----------------------------------------------------------------------------
# Key conversions between files and this project's trees.


def _strip_prefix(flat: dict[str, Any]) -> dict[str, Any]:
  for prefix in _PREFIXES:
    if flat and all(key.startswith(prefix) for key in flat):
      return {key[len(prefix) :]: value for key, value in flat.items()}
  return flat


def _global_block_numbering(flat: dict[str, Any]) -> dict[str, Any]:
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


def _squeeze_norm_params(flat: dict[str, Any]) -> dict[str, Any]:
  """Some files keep GroupNorm scales as (1, 1, 1, C); the models use (C,)."""
  out = {}
  for key, value in flat.items():
    leaf = key.rsplit('/', 1)[-1]
    if (
      leaf in ('scale', 'bias')
      and value.ndim == 4
      and value.shape[:3] == (1, 1, 1)
    ):
      value = value.reshape(-1)
    out[key] = value
  return out


def _is_bit(flat: Mapping[str, Any]) -> bool:
  return 'root_block/standardized_conv2d/kernel' in flat


def _from_bit_layout(flat: dict[str, Any]) -> dict[str, Any]:
  out = {}
  for key, value in flat.items():
    if key.endswith('group_norm/gamma'):
      key = key[: -len('gamma')] + 'scale'
    elif key.endswith('group_norm/beta'):
      key = key[: -len('beta')] + 'bias'
    elif key == 'head/conv2d/kernel':
      key, value = 'head/kernel', value.reshape(value.shape[-2:])
    elif key == 'head/conv2d/bias':
      key = 'head/bias'
    out[key] = value
  return out


def _to_bit_layout(flat: dict[str, Any]) -> dict[str, Any]:
  out = {}
  for key, value in flat.items():
    if key.endswith('group_norm/scale'):
      key = key[: -len('scale')] + 'gamma'
    elif key.endswith('group_norm/bias'):
      key = key[: -len('bias')] + 'beta'
    elif key == 'head/kernel':
      key, value = 'head/conv2d/kernel', value.reshape((1, 1, *value.shape))
    elif key == 'head/bias':
      key = 'head/conv2d/bias'
    out[_BIT_PREFIX + key] = value
  return out


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


def to_published(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A model's parameter tree -> flat published keys and float32 arrays."""
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
  flat = unstack_blocks(_global_block_numbering(flat))
  return _to_bit_layout(flat) if _is_bit(flat) else flat


def from_published(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Flat keys of any accepted file layout -> this project's parameter tree."""
  flat = {k: np.asarray(v) for k, v in flat.items()}
  if flat and all(key.startswith(_BIT_PREFIX) for key in flat):
    flat = _from_bit_layout(
      {key[len(_BIT_PREFIX) :]: value for key, value in flat.items()}
    )
  flat = _strip_prefix(flat)
  flat = unstack_blocks(_global_block_numbering(flat))
  return unflatten(_squeeze_norm_params(flat))


# ----------------------------------------------------------------------------
# Files.


def save_npz(
  path: str | os.PathLike,
  params: Mapping[str, Any],
  batch_stats: Mapping[str, Any] | None = None,
  description: Mapping[str, Any] | None = None,
) -> None:
  """Writes params (and batch statistics) as a published-layout .npz.

  The file is written beside its destination and renamed into place, so an
  interrupted save never leaves a truncated file at `path`.

  Args:
    path: the .npz file.
    params: the parameter tree (any block layout or numbering).
    batch_stats: BatchNorm statistics, for models that have them.
    description: the model's description (registry name and attribute
      overrides, as the training jobs save it), written beside the file as
      `<name>.json` so that this project can rebuild the model; other tools
      only read the .npz.
  """
  flat = to_published(params)
  if batch_stats:
    stats = {
      k: np.asarray(v, np.float32) for k, v in flatten(batch_stats).items()
    }
    flat.update({_BATCH_STATS + key: value for key, value in stats.items()})
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.tmp'
  with tmp.open('wb') as f:
    np.savez(f, **flat)
  tmp.rename(path)
  if description is not None:
    path.with_suffix('.json').write_text(
      json.dumps(dict(description), indent=2)
    )


def read_description(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a model description written by `save_npz`."""
  return json.loads(epath.Path(path).read_text())


def _read_flat(path: str | os.PathLike) -> dict[str, np.ndarray]:
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'No checkpoint file at {path}.')
  try:
    with path.open('rb') as f, np.load(f, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(
      f'{path} is not a readable .npz checkpoint ({e}). Re-download or '
      're-export it.'
    ) from e


def load_npz(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a published-layout .npz into a parameter tree.

  Accepts the published ViT/hybrid files (either block numbering), files of
  scanned models, BiT files, and the wrapping prefixes of known releases.
  Blocks come back unrolled; `fit_to_model` stacks them for a scanned model.
  """
  flat = _read_flat(path)
  params = {k: v for k, v in flat.items() if not k.startswith(_BATCH_STATS)}
  return from_published(params)


def load_npz_variables(path: str | os.PathLike) -> dict[str, Any]:
  """Reads params and, if present, batch statistics as Flax collections."""
  flat = _read_flat(path)
  variables = {'params': load_npz(path)}
  stats = {
    k[len(_BATCH_STATS) :]: v
    for k, v in flat.items()
    if k.startswith(_BATCH_STATS)
  }
  if stats:
    variables['batch_stats'] = unflatten(stats)
  return variables


# ----------------------------------------------------------------------------
# Fitting a tree to a model.


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
  flat = unstack_blocks(_global_block_numbering(flatten(params)))
  target_flat = flatten(target)
  if any(key.startswith(_SCANNED) for key in target_flat):
    flat = stack_blocks(flat)
  problem = describe_mismatch(flat, target_flat)
  if problem:
    raise CheckpointMismatchError(
      f'The checkpoint does not fit the model:{problem}'
    )
  return unflatten({k: np.asarray(v) for k, v in flat.items()})

"""The published .npz layout: read and write.

The published ViT and R50+ViT checkpoints are flat `numpy.savez` archives
whose keys are Flax parameter paths joined with '/'. This project's module
names are those paths, so a parameter tree maps to the file one to one, with
the block conversions of `tree` (numbering, scanned blocks) and:
- BiT: the BiT authors' files use a `resnet/` prefix, `gamma`/`beta` for
  GroupNorm and a 1x1 conv head (`head/conv2d`); they are translated on read
  and write.
- prefixes: known releases wrap the parameters in `opt/target/`, `params/`,
  `params/img/` or `model/`; reading strips them.
Batch statistics (only the ViTc stem has any) are stored under a
`batch_stats/` prefix.
"""

import functools
import os
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from vit_jax import workdir
from vit_jax.checkpoints.tree import (
  flatten,
  global_block_numbering,
  unflatten,
  unstack_blocks,
)
from vit_jax.models.description import ModelDescription

PyTree = Any

# Prefixes that wrap the parameters in known checkpoint files.
_PREFIXES = ('opt/target/', 'params/img/', 'params/', 'model/')
_BIT_PREFIX = 'resnet/'
_BATCH_STATS = 'batch_stats/'


# ----------------------------------------------------------------------------
# Key conversions between files and this project's trees.


def _strip_prefix(flat: dict[str, Any]) -> dict[str, Any]:
  for prefix in _PREFIXES:
    if flat and all(key.startswith(prefix) for key in flat):
      return {key[len(prefix) :]: value for key, value in flat.items()}
  return flat


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


def to_published(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A model's parameter tree -> flat published keys and float32 arrays."""
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
  flat = unstack_blocks(global_block_numbering(flat))
  return _to_bit_layout(flat) if _is_bit(flat) else flat


def from_published(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Flat keys of any accepted file layout -> this project's parameter tree."""
  flat = {k: np.asarray(v) for k, v in flat.items()}
  if flat and all(key.startswith(_BIT_PREFIX) for key in flat):
    flat = _from_bit_layout(
      {key[len(_BIT_PREFIX) :]: value for key, value in flat.items()}
    )
  flat = _strip_prefix(flat)
  flat = unstack_blocks(global_block_numbering(flat))
  return unflatten(_squeeze_norm_params(flat))


# ----------------------------------------------------------------------------
# Files.


def save_npz(
  path: str | os.PathLike,
  params: Mapping[str, Any],
  batch_stats: Mapping[str, Any] | None = None,
  description: ModelDescription | Mapping[str, Any] | None = None,
) -> epath.Path:
  """Writes params (and batch statistics) as a published-layout .npz.

  The file is written beside its destination and renamed into place, so an
  interrupted save never leaves a truncated file at `path`.

  Args:
    path: the .npz file.
    params: the parameter tree (any block layout or numbering).
    batch_stats: BatchNorm statistics, for models that have them.
    description: the model's description, written beside the file as
      `<name>.json` so that this project can rebuild the model; other tools
      only read the .npz.

  Returns:
    The path written.
  """
  flat = to_published(params)
  if batch_stats:
    stats = {
      k: np.asarray(v, np.float32) for k, v in flatten(batch_stats).items()
    }
    flat.update({_BATCH_STATS + key: value for key, value in stats.items()})
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Overwrites an earlier export (a rerun's) whole.
  workdir.replace_atomically(path, functools.partial(_write_npz, flat=flat))
  if isinstance(description, Mapping):
    description = ModelDescription.from_json(description)
  if description is not None:
    description.write(description_path(path))
  return path


def description_path(path: str | os.PathLike) -> epath.Path:
  """Where the description of a weights file lives: `<name>.json` beside it."""
  return epath.Path(path).with_suffix('.json')


def _not_an_archive(head: bytes) -> str:
  """What a file that is no zip archive seems to be, from its first bytes."""
  if not head:
    return 'it is empty'
  if head.startswith(b'\x80'):
    return (
      'it holds pickled Python objects, which are never loaded (unpickling '
      'can run any code)'
    )
  if head.startswith(b'\x93NUMPY'):
    return 'it is a single .npy array, not an archive of named parameters'
  if all(32 <= byte < 127 or byte in b'\t\r\n' for byte in head):
    return 'it is a text file'
  return f'it does not start like a zip archive (first bytes {head[:8]!r})'


def read_flat(path: str | os.PathLike) -> dict[str, np.ndarray]:
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'No checkpoint file at {path}.')
  with path.open('rb') as f:
    head = f.read(64)
  if not head.startswith(b'PK'):
    raise ValueError(
      f'{path} is not a .npz checkpoint: {_not_an_archive(head)}. Expected a '
      'zip archive of .npy arrays (numpy.savez).'
    )
  try:
    with path.open('rb') as f, np.load(f, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise ValueError(
      f'{path} is not a readable .npz checkpoint ({type(e).__name__}: {e}); '
      'a truncated or corrupted file reads so. Re-download or re-export it.'
    ) from e


def load_npz_variables(path: str | os.PathLike) -> dict[str, Any]:
  """Reads params and, if present, batch statistics as Flax collections.

  Accepts the published ViT/hybrid files (either block numbering), files of
  scanned models, BiT files, and the wrapping prefixes of known releases.
  Blocks come back unrolled; `tree.fit_to_model` stacks them for a scanned
  model.
  """
  flat = read_flat(path)
  params = {k: v for k, v in flat.items() if not k.startswith(_BATCH_STATS)}
  variables = {'params': from_published(params)}
  stats = {
    k[len(_BATCH_STATS) :]: v
    for k, v in flat.items()
    if k.startswith(_BATCH_STATS)
  }
  if stats:
    variables['batch_stats'] = unflatten(stats)
  return variables


def load_npz(path: str | os.PathLike) -> dict[str, Any]:
  """The parameter tree of a published-layout .npz (`load_npz_variables`)."""
  return load_npz_variables(path)['params']


def _write_npz(path: epath.Path, flat: Mapping[str, np.ndarray]) -> None:
  with path.open('wb') as f:
    np.savez(f, **flat)

"""Writing weights in every exchange format, and the end-of-training export.

  save(path, variables, description, format='npz')  # or 'safetensors'

'npz' is the published layout (the original code, timm's npz loader and
big_vision read it); 'safetensors' is timm's layout with the config.json of
a timm hub snapshot. Both put this project's description `<name>.json`
beside the weights, so that `load` rebuilds the model exactly.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import jax
from etils import epath

from vit_jax.checkpoints import npz, timm, training
from vit_jax.models.description import ModelDescription

FORMATS = ('npz', 'safetensors')
# Where `export` writes each format in a directory: safetensors in a
# snapshot directory of its own, since config.json names timm's config.
EXPORT_PATHS = {'npz': 'model.npz', 'safetensors': 'timm/model.safetensors'}


def parse_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
  """'npz,safetensors' -> ('npz', 'safetensors'), checked."""
  if isinstance(formats, str):
    formats = formats.split(',')
  formats = tuple(f.strip() for f in formats if f.strip())
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    raise ValueError(f'Unknown export format(s) {unknown}; use {FORMATS}.')
  return formats


def save(
  path: str | epath.Path,
  variables: Mapping[str, Any],
  description: ModelDescription,
  format: str = 'npz',
) -> epath.Path:
  """Writes a model's variables in one format; returns the path written."""
  (format,) = parse_formats([format])
  if format == 'npz':
    return npz.save_npz(
      path,
      variables['params'],
      variables.get('batch_stats'),
      description=description,
    )
  return timm.save(path, variables, description)


def export(
  checkpoint: str | epath.Path,
  directory: str | epath.Path,
  formats: str | Iterable[str] = 'npz',
  ema: bool = False,
) -> list[epath.Path]:
  """Writes a training checkpoint's variables in every requested format.

  Args:
    checkpoint: a workdir with checkpoints/, or a checkpoint directory.
    directory: where the files go (`EXPORT_PATHS`).
    formats: 'npz', 'safetensors' or both ('npz,safetensors').
    ema: export the Polyak-averaged weights.

  Returns:
    The paths written (by process 0; the others write nothing).
  """
  formats = parse_formats(formats)
  variables, description = training.load_variables(checkpoint, ema=ema)
  paths = [epath.Path(directory) / EXPORT_PATHS[f] for f in formats]
  if jax.process_index() == 0:
    for format, path in zip(formats, paths, strict=True):
      save(path, variables, description, format)
  return paths


def export_npz(
  checkpoint: str | epath.Path, path: str | epath.Path, ema: bool = False
) -> epath.Path:
  """Writes a checkpoint's (EMA) variables as one published-layout .npz."""
  variables, description = training.load_variables(checkpoint, ema=ema)
  path = epath.Path(path)
  if jax.process_index() == 0:
    save(path, variables, description, 'npz')
  return path

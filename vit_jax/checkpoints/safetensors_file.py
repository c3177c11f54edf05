"""Safetensors files and Hugging Face hub snapshots (weights + config.json).

A hub snapshot directory holds `model.safetensors` and a `config.json`
(timm's or transformers'); a `.safetensors` file may also be given on its
own, with or without the `config.json` beside it. Only safetensors are
read: PyTorch's pickled `.bin`/`.pth` files can run code when loaded, so
they are refused with the command that converts them.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from vit_jax import workdir

WEIGHTS = 'model.safetensors'
CONFIG = 'config.json'
PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pkl', '.ckpt')
_PICKLED_WEIGHTS = ('pytorch_model.bin', 'model.pth', 'model.pt')


class PickleRefusedError(ValueError):
  """A PyTorch pickle was given: it is never loaded."""


def refuse_pickles(path: epath.Path) -> None:
  """Raises for a pickled PyTorch file or a snapshot holding only one."""
  pickled = None
  if path.is_file() and path.suffix in PICKLE_SUFFIXES:
    pickled = path
  elif path.is_dir() and not (path / WEIGHTS).exists():
    pickled = next(
      (path / n for n in _PICKLED_WEIGHTS if (path / n).exists()), None
    )
  if pickled is None:
    return
  raise PickleRefusedError(
    f'{pickled} is a PyTorch pickle, which this project never loads '
    '(unpickling can run arbitrary code). Download the model.safetensors '
    'of the same model instead, or convert the file where torch is '
    'installed:\n  python -c "import torch, safetensors.torch; sd = '
    f"torch.load('{pickled}', map_location='cpu', weights_only=True); "
    'safetensors.torch.save_file({k: v.contiguous() for k, v in '
    f"sd.items()}}, '{pickled.parent / WEIGHTS}')\""
  )


def weights_file(path: epath.Path) -> epath.Path | None:
  """The .safetensors of a path: itself, or a snapshot's model.safetensors."""
  if path.is_file() and path.suffix == '.safetensors':
    return path
  if path.is_dir() and (path / WEIGHTS).is_file():
    return path / WEIGHTS
  return None


def config(path: epath.Path) -> dict[str, Any] | None:
  """The config.json beside (or inside) a weights source, if any."""
  weights = weights_file(path)
  if weights is None:
    return None
  config_file = weights.parent / CONFIG
  if not config_file.exists():
    return None
  try:
    return json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{config_file} is not valid JSON ({e}).') from e


def _not_readable(path, e) -> ValueError:
  return ValueError(
    f'{path} is not a readable safetensors file ({e}); it may be '
    'truncated: download or export it again.'
  )


def keys(path: epath.Path) -> list[str]:
  """The tensor names in a safetensors file (its header only)."""
  try:
    with safetensors.safe_open(os.fspath(path), framework='numpy') as f:
      return list(f.keys())
  except (safetensors.SafetensorError, OSError) as e:
    raise _not_readable(path, e) from e


# The float types of the safetensors format; numpy has no bfloat16 (and
# safetensors.numpy refuses it), ml_dtypes has.
_FLOATS = {
  'F64': np.float64,
  'F32': np.float32,
  'F16': np.float16,
  'BF16': ml_dtypes.bfloat16,
}


def _dtype(path, name: str, dtype: str) -> np.dtype:
  if dtype not in _FLOATS:
    raise ValueError(
      f'{path}: tensor {name!r} has dtype {dtype}; weights are floats '
      f'({sorted(_FLOATS)}).'
    )
  return np.dtype(_FLOATS[dtype])


def read(path: epath.Path) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file, as float32 numpy arrays.

  Float16 and bfloat16 tensors (often published) are widened to float32.
  """
  try:
    tensors = safetensors.deserialize(path.read_bytes())
  except (safetensors.SafetensorError, OSError) as e:
    raise _not_readable(path, e) from e
  return {
    name: np.frombuffer(t['data'], _dtype(path, name, t['dtype']))
    .reshape(t['shape'])
    .astype(np.float32)
    for name, t in tensors
  }


def write(
  path: epath.Path,
  flat: Mapping[str, np.ndarray],
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes float32 tensors beside `path` and renames the file into place."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
  contents = safetensors.numpy.save(tensors, metadata=dict(metadata or {}))
  workdir.replace_atomically(path, lambda tmp: tmp.write_bytes(contents))

"""What a job writes into its workdir, from process 0 only.

Every process of a multi-host run computes the same results; one copy is
written. Parent directories are created; the path is returned on every
process. A file is written beside its destination and renamed into place,
so that a killed job never leaves half a file (results.json marks a
finished run).
"""

import json
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray | jax.Array):
    return _jsonable(np.asarray(value).tolist())
  if isinstance(value, np.generic):
    return value.item()
  return value


def write_text(workdir: str | epath.Path, name: str, text: str) -> epath.Path:
  """Writes text as workdir/name."""
  path = epath.Path(workdir) / name
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f'.{path.name}.tmp'
    tmp.write_text(text)
    tmp.replace(path)
  return path


def write_json(workdir: str | epath.Path, name: str, value: Any) -> epath.Path:
  """Writes `value` (numpy arrays allowed) as JSON in workdir/name."""
  return write_text(
    workdir, name, json.dumps(_jsonable(value), indent=2) + '\n'
  )


CONFIG = 'config.json'


def write_config(
  workdir: str | epath.Path, config: ml_collections.ConfigDict
) -> epath.Path:
  """Records the resolved config as workdir/config.json."""
  return write_text(workdir, CONFIG, config.to_json_best_effort(indent=2))

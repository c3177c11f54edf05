"""What a job writes into its workdir, from process 0 only.

Every process of a multi-host run computes the same results; one copy is
written. Parent directories are created; the path is returned on every
process. A file is written beside its destination and renamed into place,
so that a killed job never leaves half a file (results.json marks a
finished run).
"""

import json
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

# Which files each split of an image folder holds (`record_split_files`).
SPLITS_FILE = 'splits.json'


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


def replace_atomically(
  path: epath.Path, write: Callable[[epath.Path], Any]
) -> None:
  """Writes `path` through `write(temporary path)` and a rename into place.

  The temporary file lies beside `path` (same file system): a killed
  process never leaves half a file, and an earlier file is replaced whole.
  """
  tmp = path.parent / f'.{path.name}.tmp'
  write(tmp)
  tmp.replace(path)


def write_text(workdir: str | epath.Path, name: str, text: str) -> epath.Path:
  """Writes text as workdir/name."""
  path = epath.Path(workdir) / name
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: tmp.write_text(text))
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


def record_split_files(
  workdir: str | epath.Path,
  dataset: str,
  split_files: dict[str, list[str]] | None,
) -> epath.Path | None:
  """Records which files each split holds as workdir/splits.json, once.

  The record of a folder whose held-out splits were cut from its images
  (`data.Dataset.split_files`) says which images a run never trained on. A
  resumed run keeps the first record; it warns where the folder now splits
  otherwise (files added, removed or renamed since), since the held-out
  images may then have been trained on.

  Args:
    workdir: the run's workdir.
    dataset: the dataset's name (the folder).
    split_files: {split: file paths relative to the folder}, or None where
      the examples are not files (nothing is written).

  Returns:
    The record's path, or None.
  """
  if split_files is None:
    return None
  path = epath.Path(workdir) / SPLITS_FILE
  record = _jsonable({'dataset': dataset, 'splits': split_files})
  if not path.exists():
    return write_json(workdir, SPLITS_FILE, record)
  if jax.process_index() == 0 and json.loads(path.read_text()) != record:
    logging.warning(
      'The files of %s split otherwise than %s records from the start of '
      'this run: files were added, removed or renamed since. Held-out '
      'images may have been trained on; use a new --workdir for clean '
      'splits.',
      dataset,
      path,
    )
  return path

"""Input pipeline: datasets, preprocessing and global sharded batches.

  ds = data.get_dataset(config, mesh)
  for batch in ds.train_iter(start_step):  # images, labels
    ...
  for batch in ds.eval_iter('val'):  # images, labels, mask
    ...

See `default_config()` (vit_jax/data/config.py) for the config keys and
`list_presets()` for the dataset names with presets.
"""

import importlib

from vit_jax.data.config import default_config

# The names below need TensorFlow and are imported on first use, so that
# configs and the modules that only name `data.Dataset` load without it
# (vit_jax/data/config.py).
_LAZY = {
  'Dataset': 'vit_jax.data.dataset',
  'DatasetNotPreparedError': 'vit_jax.data.sources',
  'get_dataset': 'vit_jax.data.dataset',
  'list_presets': 'vit_jax.data.presets',
}

__all__ = ['default_config', *_LAZY]


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted([*globals(), *_LAZY])

"""Input pipeline: datasets, preprocessing and global sharded batches.

  ds = data.get_dataset(config, mesh)
  for batch in ds.train_iter(start_step):  # images, labels
    ...
  for batch in ds.eval_iter('val'):  # images, labels, mask
    ...

See `default_config()` for the config keys and `list_presets()` for the
dataset names with presets.
"""

from vit_jax.data.dataset import Dataset, default_config, get_dataset
from vit_jax.data.presets import list_presets
from vit_jax.data.sources import DatasetNotPreparedError

__all__ = [
  'Dataset',
  'DatasetNotPreparedError',
  'default_config',
  'get_dataset',
  'list_presets',
]

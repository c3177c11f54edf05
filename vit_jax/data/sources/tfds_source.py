"""Sources of tfds datasets: prepared builders read as sequential records."""

import os
from collections.abc import Mapping

import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data.config import SPLITS
from vit_jax.data.presets import Preset, SplitSpec
from vit_jax.data.sources import base


class DatasetNotPreparedError(FileNotFoundError):
  """A tfds dataset has no prepared data and downloading is off."""


def _class_label(features, dataset: str) -> tfds.features.ClassLabel:
  for key in ('label', 'labels'):
    if key not in features:
      continue
    feature = features[key]
    if isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
    if isinstance(feature, tfds.features.ClassLabel):
      return feature
  raise ValueError(
    f'Dataset {dataset!r} has no ClassLabel feature "label" or "labels"; add '
    'a preset with a label function for it in vit_jax/data/presets.py.'
  )


def load_builder(
  tfds_name: str, data_dir: str | None, download: bool
) -> tfds.core.DatasetBuilder:
  """A tfds builder with prepared data, failing fast when there is none.

  Args:
    tfds_name: a registered name ('name' or 'name/config') or the directory
      of a prepared dataset.
    data_dir: where tfds looks for prepared data (tfds' default when None).
    download: whether to download and prepare missing data. It is never
      attempted otherwise: offline, tfds would retry for minutes.

  Returns:
    The builder.
  """
  if os.path.isdir(os.path.expanduser(tfds_name)):
    return tfds.builder_from_directory(os.path.expanduser(tfds_name))
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if not builder.info.splits:
    if not download:
      root = builder.data_dir_root
      raise DatasetNotPreparedError(
        f'Dataset {tfds_name!r} is not prepared in {root} (nothing at '
        f'{builder.data_dir}). Prepare it once with `tfds build {tfds_name} '
        f'--data_dir={root}` (datasets with manual downloads need their '
        f'files in {root}/downloads/manual first), or set '
        '--config.download=True to download and prepare it in the job.'
      )
    builder.download_and_prepare()
  return builder


class TfdsSource(base.Source):
  """A tfds dataset read as sequential records, images decoded later.

  An epoch of a stream is the shard in tfds' fixed order passed through a
  shuffle buffer whose seed depends on (seed, process, epoch); a stream that
  starts at position p begins at epoch p // n and skips p % n records, whose
  images are never decoded.
  """

  def __init__(
    self,
    name: str,
    preset: Preset,
    builders: Mapping[str, tfds.core.DatasetBuilder],
    splits: Mapping[str, SplitSpec] | None = None,
  ):
    """Initialises the source.

    Args:
      name: the dataset's name, for messages.
      preset: how the dataset is read.
      builders: a prepared builder for every tfds name the preset uses.
      splits: split specs overriding the preset's.
    """
    self.name = name
    self._builders = {
      split: builders[preset.split_tfds_names.get(split, preset.tfds_name)]
      for split in SPLITS
    }
    self._label = preset.label
    self.image_fn = preset.image
    features = self._builders['train'].info.features
    if preset.num_classes is None:
      label = _class_label(features, name)
      self.num_classes, self.class_names = label.num_classes, label.names
    else:
      self.num_classes = preset.num_classes
      self.class_names = preset.class_names and list(preset.class_names)
    self._specs = base.resolve_all(
      name, {**preset.splits, **(splits or {})}, self.split_infos
    )

  def split_infos(self, split):
    return self._builders[split].info.splits

  def _records(self, split: str, process_index: int, process_count: int):
    builder = self._builders[split]
    features = builder.info.features
    return builder.as_dataset(
      split=self.shard(split, process_index, process_count),
      shuffle_files=False,
      decoders={
        key: tfds.decode.SkipDecoding()
        for key, feature in features.items()
        if isinstance(feature, tfds.features.Image)
      },
    )

  def _record(self, features) -> dict[str, tf.Tensor]:
    return {
      'image': features['image'],
      'label': tf.cast(self._label(features), tf.int64),
    }

  def read(self, split, process_index=0, process_count=1):
    if self.num_examples(split, process_index, process_count):
      records = self._records(split, process_index, process_count)
    else:
      # tfds refuses empty reads. With more processes than examples a shard
      # is empty; it still needs the element spec.
      records = self._records(split, 0, 1).take(0)
    return records.map(self._record, num_parallel_calls=tf.data.AUTOTUNE)

  def stream(
    self,
    split,
    *,
    seed,
    start,
    shuffle_buffer,
    local_batch,
    process_index=0,
    process_count=1,
  ):
    del local_batch  # Each process streams its own shard.
    n = self.num_examples(split, process_index, process_count)
    self._check_not_empty(split, process_index, n)
    records = self._records(split, process_index, process_count)
    buffer = max(1, min(shuffle_buffer, n))

    def epoch(e):
      shuffle_seed = tf.random.stateless_uniform(
        [],
        base.epoch_key(seed, process_index, e),
        minval=0,
        maxval=2**31 - 1,
        dtype=tf.int64,
      )
      return records.shuffle(buffer, seed=shuffle_seed)

    first_epoch, offset = divmod(start, n)
    epochs = tf.data.Dataset.range(first_epoch, base.END).flat_map(epoch)
    return tf.data.Dataset.zip(
      epochs.skip(offset), tf.data.Dataset.range(start, base.END)
    ).map(
      lambda features, index: {**self._record(features), 'index': index},
      num_parallel_calls=tf.data.AUTOTUNE,
    )


def generic_preset(tfds_name: str, builder) -> Preset:
  """The splits of a tfds dataset without a preset: its own."""
  val = 'validation' if 'validation' in builder.info.splits else 'test'
  splits = {'train': 'train', 'val': val, 'test': 'test', 'train_full': 'train'}
  if 'image' not in builder.info.features:
    raise ValueError(
      f'Dataset {tfds_name!r} has no "image" feature; add a preset for it in '
      'vit_jax/data/presets.py.'
    )
  return Preset(tfds_name, splits)

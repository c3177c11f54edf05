"""Where examples come from: tfds builders, image folders and digits scans.

A source serves the four splits of one dataset (`presets.SPLITS`). For one
process's shard of a split it yields records {'image', 'label'}: 'image' is
encoded bytes (decoded later, so that skipped records cost no decoding) or a
uint8 HxWx3 array; 'label' is an int64 class id, or an int64 vector of class
ids for an example with a set of labels.

  read(split, ...)    the shard once, in a fixed order (evaluation);
  stream(split, ...)  the shard endlessly, epoch after epoch, each epoch in an
                      order that depends only on (seed, process, epoch),
                      starting at any position; records carry 'index', their
                      position in the stream.

A process's shard is tfds' even split of the split (shard sizes differ by at
most one) for every kind of source, so split strings such as
'train[:90%]+test[:200]' mean the same for a folder as for a tfds dataset.
"""

import abc
import concurrent.futures
import dataclasses
import difflib
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from vit_jax.data import presets
from vit_jax.data.presets import SPLITS, Head, Preset, SplitSpec

# Positions of an endless stream stay below this.
_END = 2**62
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
# Formats tf.io.decode_image reads, as PIL names them.
_DECODABLE = ('JPEG', 'MPO', 'PNG', 'GIF', 'BMP')
Ranges = list[tuple[str, int, int]]


class DatasetNotPreparedError(FileNotFoundError):
  """A tfds dataset has no prepared data and downloading is off."""


def _absolute(split: tfds.typing.SplitArg, infos: Mapping) -> Ranges:
  """(tfds split, start, end) ranges of a split string or an even split."""
  if isinstance(split, str):
    split = tfds.core.ReadInstruction.from_spec(split)
  return [
    (
      i.splitname,
      i.from_ or 0,
      infos[i.splitname].num_examples if i.to is None else i.to,
    )
    for i in split.to_absolute(infos)
  ]


def resolve_split(spec: SplitSpec, infos: Mapping) -> str:
  """The tfds split string of a split spec, with Heads made absolute."""
  if isinstance(spec, tuple):
    return '+'.join(resolve_split(part, infos) for part in spec)
  if isinstance(spec, Head):
    parts, left = [], spec.n
    for name, start, end in _absolute(spec.split, infos):
      take = min(left, end - start)
      if take > 0:
        parts.append(f'{name}[{start}:{start + take}]')
        left -= take
    return '+'.join(parts)
  _absolute(spec, infos)  # Fails early on an unknown split or a typo.
  return spec


def _resolve_all(
  dataset: str, specs: Mapping[str, SplitSpec], infos: Callable
) -> dict[str, str]:
  """The tfds split string of each of SPLITS, checked to be non-empty."""
  resolved = {}
  for split in SPLITS:
    try:
      resolved[split] = resolve_split(specs[split], infos(split))
      size = sum(b - a for _, a, b in _absolute(resolved[split], infos(split)))
    except (ValueError, KeyError, AssertionError) as e:
      problem = str(e).rstrip('.')
    else:
      if size:
        continue
      problem = 'it has no examples'
    raise ValueError(
      f'Dataset {dataset!r}: cannot read its {split!r} split as '
      f'{specs[split]!r}: {problem}. Set --config.splits.{split} to a split '
      'the dataset has.'
    )
  return resolved


def _epoch_key(seed: int, process_index: int, epoch: tf.Tensor) -> tf.Tensor:
  key = tf.constant([seed, process_index], tf.int64)
  return tf.random.experimental.stateless_fold_in(key, epoch)


class Source(abc.ABC):
  """The four splits of one dataset, sharded over processes.

  Attributes:
    name: the dataset's name, for messages.
    num_classes: number of classes.
    class_names: class names, or None where the data has none.
    image_fn: uint8 RGB image -> uint8 RGB image, applied after decoding.
  """

  name: str
  num_classes: int
  class_names: list[str] | None
  image_fn: Callable[[tf.Tensor], tf.Tensor] | None = None
  # Whether training batches are the same for any number of processes.
  process_invariant: bool = False
  # The tfds split string of each of SPLITS.
  _specs: dict[str, str]

  @abc.abstractmethod
  def split_infos(self, split: str) -> Mapping[str, tfds.core.SplitInfo]:
    """The sizes of the tfds splits a split is made of."""

  @abc.abstractmethod
  def read(
    self, split: str, process_index: int = 0, process_count: int = 1
  ) -> tf.data.Dataset:
    """One process's shard of a split, once, in a fixed order."""

  @abc.abstractmethod
  def stream(
    self,
    split: str,
    *,
    seed: int,
    start: int,
    shuffle_buffer: int,
    local_batch: int,
    process_index: int = 0,
    process_count: int = 1,
  ) -> tf.data.Dataset:
    """This process's training examples, endlessly, from position `start`.

    Each record carries an 'index' that keys its random augmentation. Where
    `process_invariant` is True it is the example's position in the global
    stream, so global batches do not depend on the number of processes.
    """

  def shard(
    self, split: str, process_index: int = 0, process_count: int = 1
  ) -> tfds.typing.SplitArg:
    """One process's part of a split: tfds' even split."""
    return tfds.even_splits(self._specs[split], n=process_count)[process_index]

  def ranges(
    self, split: str, process_index: int = 0, process_count: int = 1
  ) -> Ranges:
    """(tfds split, start, end) ranges of one process's shard of a split."""
    shard = self.shard(split, process_index, process_count)
    return _absolute(shard, self.split_infos(split))

  def num_examples(
    self, split: str, process_index: int = 0, process_count: int = 1
  ) -> int:
    """Size of one process's shard of a split (of the split by default)."""
    ranges = self.ranges(split, process_index, process_count)
    return sum(end - start for _, start, end in ranges)

  def _check_not_empty(self, split: str, process_index: int, size: int):
    if not size:
      raise ValueError(
        f'Dataset {self.name!r}: the {split!r} split has no examples for '
        f'process {process_index}.'
      )


class ArraySource(Source):
  """Examples addressable by index: decoded arrays or image files.

  Every split's epoch order is a permutation computed from its index
  (`tf.random.experimental.index_shuffle`), so a stream starts at any position
  without reading what comes before. Training streams are process invariant:
  every process follows the same global order and reads the rows of each
  global batch that fall to it, so the global batches, augmentation
  included, are the same whatever the number of processes.
  """

  process_invariant = True

  def __init__(
    self,
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    split_sizes: Mapping[str, int],
    splits: Mapping[str, SplitSpec],
    class_names: Sequence[str],
  ):
    """Initialises the source.

    Args:
      name: the dataset's name, for messages.
      images: uint8 (N, H, W, 3) images, or N image file paths.
      labels: int (N,) class ids.
      split_sizes: the tfds-style base splits, laid out one after the other
        in `images` (e.g. {'train': 1437, 'test': 360}).
      splits: the split spec of each of SPLITS.
      class_names: the class names.
    """
    self.name = name
    self.class_names = list(class_names)
    self.num_classes = len(class_names)
    self._files = images.dtype.kind in 'OUS'
    self._images = tf.constant(images)
    self._labels = tf.constant(labels, tf.int64)
    offsets = np.cumsum([0, *split_sizes.values()])
    self._offsets = dict(zip(split_sizes, offsets.tolist(), strict=False))
    self._infos = {
      split: tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0)
      for split, n in split_sizes.items()
    }
    self._specs = _resolve_all(name, splits, self.split_infos)

  def split_infos(self, split):
    del split  # The same base splits make up every split.
    return self._infos

  def _rows(self, split: str, process_index: int, process_count: int):
    ranges = self.ranges(split, process_index, process_count)
    rows = [np.arange(a, b) + self._offsets[s] for s, a, b in ranges]
    return np.concatenate([np.zeros([0], np.int64), *rows]).astype(np.int64)

  def _record(self, row: tf.Tensor) -> dict[str, tf.Tensor]:
    image = tf.gather(self._images, row)
    if self._files:
      image = tf.io.read_file(image)
    return {'image': image, 'label': tf.gather(self._labels, row)}

  def read(self, split, process_index=0, process_count=1):
    rows = self._rows(split, process_index, process_count)
    return tf.data.Dataset.from_tensor_slices(rows).map(
      self._record, num_parallel_calls=tf.data.AUTOTUNE
    )

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
    del shuffle_buffer  # Every epoch is a full permutation.
    rows = self._rows(split, 0, 1)  # The whole split, in every process.
    self._check_not_empty(split, process_index, len(rows))
    rows, n = tf.constant(rows), len(rows)

    def record(local_position):
      # The local position's place in the global stream: global batch
      # `step` holds each process's local_batch rows in process order.
      step, offset = local_position // local_batch, local_position % local_batch
      index = (step * process_count + process_index) * local_batch + offset
      epoch, position = index // n, index % n
      key = _epoch_key(seed, 0, epoch)
      shuffled = tf.random.experimental.index_shuffle(
        position, key, tf.constant(n - 1, tf.int64)
      )
      return {**self._record(tf.gather(rows, shuffled)), 'index': index}

    return tf.data.Dataset.range(start, _END).map(
      record, num_parallel_calls=tf.data.AUTOTUNE
    )


def digits(splits: Mapping[str, SplitSpec] | None = None) -> ArraySource:
  """scikit-learn's 1,797 8x8 digit scans, offline: 10 classes.

  A stratified 80/20 split with a fixed seed gives 'train' (1,437) and 'test'
  (360). Pixel values 0..16 are scaled to 0..255 and the grey tiled to RGB.

  Args:
    splits: split specs overriding the defaults (train: 90% of 'train', val:
      the other 10%, test: 'test', train_full: 'train').

  Returns:
    The source.
  """
  # Imported here: scikit-learn is only needed for this dataset.
  from sklearn import datasets, model_selection

  data = datasets.load_digits()
  train, test = model_selection.train_test_split(
    np.arange(len(data.target)),
    test_size=0.2,
    stratify=data.target,
    random_state=0,
  )
  order = np.concatenate([train, test])
  grey = np.round(data.images[order] * (255 / 16)).astype(np.uint8)
  defaults = {
    'train': 'train[:90%]',
    'val': 'train[90%:]',
    'test': 'test',
    'train_full': 'train',
  }
  return ArraySource(
    presets.DIGITS,
    np.repeat(grey[..., None], 3, axis=-1),
    data.target[order],
    {'train': len(train), 'test': len(test)},
    {**defaults, **(splits or {})},
    [str(d) for d in range(10)],
  )


def _image_problem(path: str) -> str | None:
  """Why a file is not a readable image tf can decode, or None."""
  try:
    with Image.open(path) as image:
      if image.format not in _DECODABLE:
        return f'format {image.format} is not one of {_DECODABLE}'
      # Checks the whole PNG stream (CRCs, truncation) without decoding.
      image.verify()
  except Exception as e:  # Any failure means the file is unreadable.
    return f'{type(e).__name__}: {e}'
  return None


def _list_images(directory: str) -> list[str]:
  found = []
  for parent, dirs, files in os.walk(directory):
    dirs.sort()
    found += [
      os.path.join(parent, f)
      for f in sorted(files)
      if f.lower().endswith(IMAGE_EXTENSIONS)
    ]
  return found


def _readable(paths: list[str], root: str) -> list[bool]:
  """Checks every file once; reports and counts the unreadable ones."""
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    problems = list(pool.map(_image_problem, paths))
  for path, problem in zip(paths, problems, strict=True):
    if problem:
      logging.warning('Skipping unreadable image %s (%s).', path, problem)
  skipped = sum(p is not None for p in problems)
  if skipped:
    logging.warning(
      'Skipped %d of %d files under %s that are not readable images.',
      skipped,
      len(paths),
      root,
    )
  return [p is None for p in problems]


def image_folder(
  root: str, splits: Mapping[str, SplitSpec] | None = None
) -> ArraySource:
  """Images in `root/{train,test}/<class>/*` (and optionally `root/val`).

  Class names are the sorted sub-directory names of `train`; every split must
  have the same classes. Files that are not readable images are reported with
  their path, counted and skipped. Each split's files are put in a fixed
  pseudo-random order, so that a slice such as 'train[90%:]' or a process's
  shard samples every class.

  Args:
    root: the folder.
    splits: split specs overriding the defaults (train: 'train', val: 'val'
      or 'validation' where present, else 'test', test: 'test', train_full:
      'train').

  Returns:
    The source.
  """
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Image folder {root!r} does not exist.')
  present = [
    d
    for d in ('train', 'val', 'validation', 'test')
    if os.path.isdir(os.path.join(root, d))
  ]
  if 'train' not in present or 'test' not in present:
    raise ValueError(
      f'Image folder {root!r} needs train/<class>/ and test/<class>/ '
      f'sub-directories of images; it has {sorted(os.listdir(root))}.'
    )
  classes = {
    split: sorted(
      e.name for e in os.scandir(os.path.join(root, split)) if e.is_dir()
    )
    for split in present
  }
  for split in present:
    if classes[split] != classes['train']:
      only_train = sorted(set(classes['train']) - set(classes[split]))
      only_split = sorted(set(classes[split]) - set(classes['train']))
      raise ValueError(
        f'Image folder {root!r}: the classes of {split}/ differ from those of '
        f'train/ (only in train/: {only_train}; only in {split}/: '
        f'{only_split}).'
      )
  paths, labels, sizes = [], [], {}
  for split in present:
    files = [
      (path, label)
      for label, name in enumerate(classes['train'])
      for path in _list_images(os.path.join(root, split, name))
    ]
    ok = _readable([path for path, _ in files], os.path.join(root, split))
    files = [f for f, good in zip(files, ok, strict=True) if good]
    if not files:
      raise ValueError(
        f'Image folder {root!r}: no readable images '
        f'({", ".join(IMAGE_EXTENSIONS)}) under {split}/<class>/.'
      )
    order = np.random.default_rng(0).permutation(len(files))
    paths += [files[i][0] for i in order]
    labels += [files[i][1] for i in order]
    sizes[split] = len(files)
  val = next((d for d in ('val', 'validation') if d in present), 'test')
  defaults = {
    'train': 'train',
    'val': val,
    'test': 'test',
    'train_full': 'train',
  }
  return ArraySource(
    root,
    np.array(paths, dtype=object),
    np.array(labels),
    sizes,
    {**defaults, **(splits or {})},
    classes['train'],
  )


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


class TfdsSource(Source):
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
    self._specs = _resolve_all(
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
        _epoch_key(seed, process_index, e),
        minval=0,
        maxval=2**31 - 1,
        dtype=tf.int64,
      )
      return records.shuffle(buffer, seed=shuffle_seed)

    first_epoch, offset = divmod(start, n)
    epochs = tf.data.Dataset.range(first_epoch, _END).flat_map(epoch)
    return tf.data.Dataset.zip(
      epochs.skip(offset), tf.data.Dataset.range(start, _END)
    ).map(
      lambda features, index: {**self._record(features), 'index': index},
      num_parallel_calls=tf.data.AUTOTUNE,
    )


def _generic_preset(tfds_name: str, builder) -> Preset:
  val = 'validation' if 'validation' in builder.info.splits else 'test'
  splits = {'train': 'train', 'val': val, 'test': 'test', 'train_full': 'train'}
  if 'image' not in builder.info.features:
    raise ValueError(
      f'Dataset {tfds_name!r} has no "image" feature; add a preset for it in '
      'vit_jax/data/presets.py.'
    )
  return Preset(tfds_name, splits)


def _unknown(name: str) -> ValueError:
  close = difflib.get_close_matches(name, presets.list_presets(), n=5)
  hint = f' Close preset names: {close}.' if close else ''
  return ValueError(
    f'Unknown dataset {name!r}.{hint} Use a preset (see '
    'vit_jax.data.list_presets()), "tfds:NAME" for any tfds dataset, or a '
    'directory with train/<class>/ and test/<class>/ images.'
  )


def open_source(
  name: str,
  *,
  splits: Mapping[str, SplitSpec] | None = None,
  data_dir: str | None = None,
  download: bool = False,
  imagenet21k_name: str = 'imagenet21k',
) -> Source:
  """The source of a dataset name.

  Args:
    name: 'digits'; a preset name (`presets.list_presets()`); 'tfds:NAME' or
      a registered tfds name; or a directory of images (see `image_folder`).
    splits: split specs overriding the defaults, by split name.
    data_dir: where tfds looks for prepared data.
    download: whether tfds may download and prepare missing data.
    imagenet21k_name: tfds name or directory of the ImageNet-21k data.

  Returns:
    The source.
  """
  splits = {k: v for k, v in (splits or {}).items() if v}
  if name == presets.DIGITS:
    return digits(splits)
  if name in presets.PRESETS:
    preset = presets.PRESETS[name]
    if name == 'imagenet21k':
      preset = dataclasses.replace(preset, tfds_name=imagenet21k_name)
    tfds_names = {preset.tfds_name, *preset.split_tfds_names.values()}
    builders = {n: load_builder(n, data_dir, download) for n in tfds_names}
    return TfdsSource(name, preset, builders, splits)
  path = os.path.expanduser(name)
  if os.path.isdir(path) and not os.path.exists(
    os.path.join(path, 'dataset_info.json')
  ):
    return image_folder(path, splits)
  if name.startswith(('/', '.', '~')) and not os.path.exists(path):
    raise FileNotFoundError(f'Dataset directory {name!r} does not exist.')
  if name.startswith('vtab/'):
    raise _unknown(name)
  tfds_name = name.removeprefix('tfds:')
  try:
    builder = load_builder(tfds_name, data_dir, download)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise _unknown(name) from e
  preset = _generic_preset(tfds_name, builder)
  return TfdsSource(name, preset, {tfds_name: builder}, splits)

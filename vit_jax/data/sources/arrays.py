"""Sources of examples addressable by index: decoded arrays or image files.

`digits` is scikit-learn's digit scans held in memory; image folders
(`folder.image_folder`) are ArraySources of image files.
"""

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from vit_jax.data import presets
from vit_jax.data.config import SPLITS
from vit_jax.data.presets import SplitSpec
from vit_jax.data.sources import base


@dataclasses.dataclass(frozen=True)
class ImageFiles:
  """Image files under a folder.

  Attributes:
    root: the folder.
    paths: the files, relative to `root`.
    via_pil: for each file, whether PIL decodes it: files TF would decode
      otherwise than PIL shows them (palette or 1-bit BMPs, CMYK JPEGs,
      WebP, ...) are converted to RGB by PIL and handed on as 24-bit BMPs.
  """

  root: str
  paths: Sequence[str]
  via_pil: Sequence[bool]


def _rgb_bmp(path: bytes) -> bytes:
  """The image at `path` as PIL shows it in RGB, as a 24-bit BMP."""
  buffer = io.BytesIO()
  with Image.open(path.decode()) as image:
    image.convert('RGB').save(buffer, format='BMP')
  return buffer.getvalue()


class ArraySource(base.Source):
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
    images: np.ndarray | ImageFiles,
    labels: np.ndarray,
    split_sizes: Mapping[str, int],
    splits: Mapping[str, SplitSpec],
    class_names: Sequence[str],
  ):
    """Initialises the source.

    Args:
      name: the dataset's name, for messages.
      images: uint8 (N, H, W, 3) images, or N image files.
      labels: int (N,) class ids.
      split_sizes: the tfds-style base splits, laid out one after the other
        in `images` (e.g. {'train': 1437, 'test': 360}).
      splits: the split spec of each of SPLITS.
      class_names: the class names.
    """
    self.name = name
    self.class_names = list(class_names)
    self.num_classes = len(class_names)
    self._files = images if isinstance(images, ImageFiles) else None
    if self._files is None:
      self._images = tf.constant(images)
    else:
      self._images = tf.constant(
        [os.path.join(images.root, path) for path in images.paths]
      )
      self._via_pil = tf.constant(np.asarray(images.via_pil, bool))
    self._labels = tf.constant(labels, tf.int64)
    offsets = np.cumsum([0, *split_sizes.values()])
    self._offsets = dict(zip(split_sizes, offsets.tolist(), strict=False))
    self._infos = {
      split: tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0)
      for split, n in split_sizes.items()
    }
    self._specs = base.resolve_all(name, splits, self.split_infos)

  def split_infos(self, split):
    del split  # The same base splits make up every split.
    return self._infos

  def _rows(self, split: str, process_index: int, process_count: int):
    ranges = self.ranges(split, process_index, process_count)
    rows = [np.arange(a, b) + self._offsets[s] for s, a, b in ranges]
    return np.concatenate([np.zeros([0], np.int64), *rows]).astype(np.int64)

  def split_files(self):
    if self._files is None:
      return None
    return {
      split: sorted(self._files.paths[row] for row in self._rows(split, 0, 1))
      for split in SPLITS
    }

  def _read(self, path: tf.Tensor, row: tf.Tensor) -> tf.Tensor:
    """The encoded image at `path`, re-encoded by PIL where it must be."""
    if not any(self._files.via_pil):
      return tf.io.read_file(path)

    def via_pil():
      encoded = tf.numpy_function(_rgb_bmp, [path], tf.string, stateful=False)
      return tf.ensure_shape(encoded, [])

    return tf.cond(
      tf.gather(self._via_pil, row), via_pil, lambda: tf.io.read_file(path)
    )

  def _record(self, row: tf.Tensor) -> dict[str, tf.Tensor]:
    image = tf.gather(self._images, row)
    if self._files is not None:
      image = self._read(image, row)
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
      key = base.epoch_key(seed, 0, epoch)
      shuffled = tf.random.experimental.index_shuffle(
        position, key, tf.constant(n - 1, tf.int64)
      )
      return {**self._record(tf.gather(rows, shuffled)), 'index': index}

    return tf.data.Dataset.range(start, base.END).map(
      record, num_parallel_calls=tf.data.AUTOTUNE
    )


def digit_scans() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digit scans: uint8 (N, 8, 8) grey in 0..255, digits."""
  from sklearn import datasets  # Only needed for the digits.

  data = datasets.load_digits()
  # Pixel values are 0..16.
  grey = np.round(data.images * (255 / 16)).astype(np.uint8)
  return grey, data.target


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
  from sklearn import model_selection

  grey, labels = digit_scans()
  train, test = model_selection.train_test_split(
    np.arange(len(labels)),
    test_size=0.2,
    stratify=labels,
    random_state=0,
  )
  order = np.concatenate([train, test])
  defaults = {
    'train': 'train[:90%]',
    'val': 'train[90%:]',
    'test': 'test',
    'train_full': 'train',
  }
  return ArraySource(
    presets.DIGITS,
    np.repeat(grey[order][..., None], 3, axis=-1),
    labels[order],
    {'train': len(train), 'test': len(test)},
    {**defaults, **(splits or {})},
    [str(d) for d in range(10)],
  )

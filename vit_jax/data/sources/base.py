"""What every source of examples shares: splits, shards and the stream order.

A source serves the four splits of one dataset (`config.SPLITS`). For one
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
from collections.abc import Callable, Mapping

import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data.config import SPLITS
from vit_jax.data.presets import Head, SplitSpec

# Positions of an endless stream stay below this.
END = 2**62
Ranges = list[tuple[str, int, int]]


def absolute_ranges(split: tfds.typing.SplitArg, infos: Mapping) -> Ranges:
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
    for name, start, end in absolute_ranges(spec.split, infos):
      take = min(left, end - start)
      if take > 0:
        parts.append(f'{name}[{start}:{start + take}]')
        left -= take
    return '+'.join(parts)
  absolute_ranges(spec, infos)  # Fails early on an unknown split or a typo.
  return spec


def resolve_all(
  dataset: str, specs: Mapping[str, SplitSpec], infos: Callable
) -> dict[str, str]:
  """The tfds split string of each of SPLITS, checked to be non-empty."""
  resolved = {}
  for split in SPLITS:
    try:
      resolved[split] = resolve_split(specs[split], infos(split))
      size = sum(
        b - a for _, a, b in absolute_ranges(resolved[split], infos(split))
      )
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


def epoch_key(seed: int, process_index: int, epoch: tf.Tensor) -> tf.Tensor:
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

  def split_files(self) -> dict[str, list[str]] | None:
    """The files of each of SPLITS, relative to the dataset's folder.

    None where the examples are not files (digits, tfds datasets).
    """
    return None

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
    return absolute_ranges(shard, self.split_infos(split))

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

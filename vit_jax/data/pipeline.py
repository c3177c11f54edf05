"""Per-process tf.data pipelines and the global sharded batches built on them.

Training: a process streams its part of the train split from example
start_step * local_batch (`sources.Source.stream`), preprocesses every example
with keys from its stream position, batches, and mixes up each batch with a
key from its step. Batch i is therefore a function of (seed, process,
start_step + i) alone, so a resumed run sees the batches an uninterrupted run
would. For random-access sources (digits, image folders) the global batches
(before mixup, which mixes within a process's rows) do not depend on the
number of processes either.

Evaluation: a process reads its shard once and pads it with masked examples
to a number of batches that is the same on every process, so every example is
seen exactly once and no process waits for another.

Each process contributes its local batch to a global jax.Array sharded over
the mesh's 'data' axis (`jax.make_array_from_process_local_data`).
"""

import collections
import math
from collections.abc import Iterable, Iterator, Mapping

import jax
import numpy as np
import tensorflow as tf
from jax.sharding import Sharding

from vit_jax.data import preprocess
from vit_jax.data.sources import Source

# Steps of an endless stream stay below this.
_END = 2**62


def _options() -> tf.data.Options:
  options = tf.data.Options()
  # Parallel maps must keep the order, or batches would depend on timing.
  options.deterministic = True
  return options


def local_batch_size(batch_size: int, process_count: int, what: str) -> int:
  """This process's share of a global batch size."""
  if batch_size % process_count:
    raise ValueError(
      f'{what}={batch_size} is not divisible by the {process_count} '
      f'processes; use a multiple of {process_count}.'
    )
  return batch_size // process_count


def train_dataset(
  source: Source,
  config,
  *,
  start_step: int = 0,
  split: str = 'train',
  process_index: int = 0,
  process_count: int = 1,
) -> tf.data.Dataset:
  """This process's endless training batches from step `start_step`.

  Args:
    source: the data.
    config: the data config (`vit_jax.data.default_config()`).
    start_step: the first step served.
    split: the split trained on ('train_full' for a final run).
    process_index: this process.
    process_count: number of processes.

  Returns:
    Batches {'images': float32 (b, S, S, 3) in [-1, 1], 'labels': float32
    (b, K)} with b = config.batch_size / process_count.
  """
  batch = local_batch_size(config.batch_size, process_count, 'batch_size')
  pp = preprocess.resolve_augreg(config.pp)
  examples = source.stream(
    split,
    seed=config.seed,
    start=start_step * batch,
    shuffle_buffer=config.shuffle_buffer,
    local_batch=batch,
    process_index=process_index,
    process_count=process_count,
  )
  fn = preprocess.train_fn(
    pp,
    image_size=config.image_size,
    num_classes=source.num_classes,
    loss=config.loss,
    seed=config.seed,
    # A process-invariant stream's indices are global: one key space.
    process_index=0 if source.process_invariant else process_index,
    image_fn=source.image_fn,
  )
  batches = examples.map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(
    batch, drop_remainder=True
  )
  alpha = pp.mixup_alpha
  if alpha > 0:
    steps = tf.data.Dataset.range(start_step, _END)
    batches = tf.data.Dataset.zip(batches, steps).map(
      lambda b, step: preprocess.mixup(
        b, preprocess.key_for(config.seed, 1, process_index, step), alpha
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  return batches.prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_steps(
  source: Source, split: str, batch_size: int, process_count: int
) -> int:
  """Batches per evaluation pass, the same on every process."""
  batch = local_batch_size(batch_size, process_count, 'eval_batch_size')
  largest = max(
    source.num_examples(split, p, process_count) for p in range(process_count)
  )
  return math.ceil(largest / batch)


def eval_dataset(
  source: Source,
  config,
  split: str,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> tf.data.Dataset:
  """This process's evaluation batches of a split, padded and masked.

  Args:
    source: the data.
    config: the data config.
    split: one of 'train', 'val', 'test', 'train_full'.
    process_index: this process.
    process_count: number of processes.

  Returns:
    `eval_steps` batches {'images', 'labels', 'mask'}: float32 mask (b,) is 1
    for real examples and 0 for padding, b = eval_batch_size / process_count.
  """
  batch = local_batch_size(
    config.eval_batch_size, process_count, 'eval_batch_size'
  )
  steps = eval_steps(source, split, config.eval_batch_size, process_count)
  fn = preprocess.eval_fn(
    config.pp,
    image_size=config.image_size,
    num_classes=source.num_classes,
    loss=config.loss,
    image_fn=source.image_fn,
  )
  examples = source.read(split, process_index, process_count).map(
    fn, num_parallel_calls=tf.data.AUTOTUNE
  )
  blank = tf.nest.map_structure(
    lambda spec: tf.zeros(spec.shape, spec.dtype), examples.element_spec
  )
  padding = tf.data.Dataset.from_tensors(blank).repeat()
  # take() also bounds a process whose data holds more than its metadata
  # says, so that every process stops after the same number of batches.
  examples = examples.concatenate(padding).take(steps * batch)
  return (
    examples.batch(batch).prefetch(tf.data.AUTOTUNE).with_options(_options())
  )


def make_global(
  batch: Mapping[str, np.ndarray], sharding: Sharding, global_batch: int
) -> dict[str, jax.Array]:
  """Global arrays from every process's local rows of a batch."""
  return {
    key: jax.make_array_from_process_local_data(
      sharding, value, (global_batch, *value.shape[1:])
    )
    for key, value in batch.items()
  }


def prefetch_to_device(iterator: Iterable, size: int) -> Iterator:
  """Keeps `size` batches in flight to the devices ahead of the consumer.

  Transfers are asynchronous, so batches made global early are copied while
  the devices compute. size=0 passes batches through.
  """
  queue = collections.deque()
  for item in iterator:
    queue.append(item)
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()

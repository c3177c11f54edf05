"""Throughput of the training input pipeline on this machine's CPU.

Writes a temporary folder of ImageNet-sized JPEGs, then times decoded and
augmented training batches at 224x224 (inception crop, flip, optionally
RandAugment) on one core and on all cores, and compares with the images/s a
ViT-B/16 training step consumes on a CPU.

  python -m vit_jax.data.throughput [--images=256] [--seconds=10]
"""

import os
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import app, flags
from PIL import Image

from vit_jax.data import config as data_config
from vit_jax.data import pipeline, sources

_IMAGES = flags.DEFINE_integer('images', 256, 'JPEGs to write.')
_SECONDS = flags.DEFINE_float('seconds', 10.0, 'Timing per measurement.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Batch size.')
_STEP_RATE = flags.DEFINE_float(
  'step_images_per_second',
  4.5,
  'Images/s a ViT-B/16 training step (bf16) consumes on this CPU.',
)


def write_jpegs(root: str, count: int):
  """ImageNet-like JPEGs: 500x375, smooth texture, about 100 kB each."""
  rng = np.random.default_rng(0)
  for i in range(count):
    split = 'test' if i % 8 < 2 else 'train'
    directory = os.path.join(root, split, f'c{i % 2}')
    os.makedirs(directory, exist_ok=True)
    coarse = rng.integers(0, 256, (48, 64, 3), np.uint8)
    image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
    noise = rng.normal(0, 12, (375, 500, 3))
    pixels = np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(
      os.path.join(directory, f'{i}.jpg'), quality=90
    )


def images_per_second(
  source, config, *, threads: int | None, seconds: float
) -> float:
  """Training images/s of a source's pipeline, on `threads` (None: all)."""
  batches = pipeline.train_dataset(source, config)
  if threads:
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    batches = batches.with_options(options)
  iterator = iter(batches)
  for _ in range(3):  # Warm up: tracing, thread pools, autotuning.
    next(iterator)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    count += int(next(iterator)['images'].shape[0])
  return count / (time.perf_counter() - start)


def main(argv):
  del argv
  cores = os.cpu_count() or 1
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, _IMAGES.value)
    source = sources.image_folder(root)
    config = data_config.default_config()
    config.batch_size = _BATCH.value
    config.image_size = 224
    print(
      f'{_IMAGES.value} JPEGs of 500x375 -> {config.image_size}x'
      f'{config.image_size} training batches of {config.batch_size}; '
      f'{cores} cores.'
    )
    print(f'{"images/s":<44}{"1 core":>8}{f"{cores} cores":>10}')
    for name, randaugment_layers in (
      ('inception crop + flip', 0),
      ('inception crop + flip + RandAugment(2, 15)', 2),
    ):
      config.pp.randaugment_layers = randaugment_layers
      config.pp.randaugment_magnitude = 15
      one = images_per_second(source, config, threads=1, seconds=_SECONDS.value)
      every = images_per_second(
        source, config, threads=None, seconds=_SECONDS.value
      )
      print(f'{name:<44}{one:>8.1f}{every:>10.1f}')
      print(
        f'  one core feeds {one / _STEP_RATE.value:.0f}x the '
        f'{_STEP_RATE.value} img/s of a ViT-B/16 bf16 training step on this '
        f'CPU; all cores {every / cores:.1f} img/s per core.'
      )


if __name__ == '__main__':
  app.run(main)

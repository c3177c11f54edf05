"""The data layer's entry point: a config and a mesh in, global batches out."""

from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vit_jax import sharding
from vit_jax.data import pipeline, preprocess, sources
from vit_jax.data.config import SPLITS


def _check_choice(value, choices, key: str):
  if value not in choices:
    raise ValueError(f'config.{key}={value!r}; use one of {list(choices)}.')


def _check_config(config, data_devices: int):
  _check_choice(config.loss, preprocess.LOSSES, 'loss')
  _check_choice(config.pp.train_crop, preprocess.TRAIN_CROPS, 'pp.train_crop')
  _check_choice(config.pp.eval_crop, preprocess.EVAL_CROPS, 'pp.eval_crop')
  if not 0 < config.pp.min_area <= 1:
    raise ValueError(
      f'config.pp.min_area={config.pp.min_area} is not in (0, 1].'
    )
  preprocess.resolve_augreg(config.pp)  # Checks the AugReg setting.
  if config.pp.mixup_alpha < 0:
    raise ValueError(f'config.pp.mixup_alpha={config.pp.mixup_alpha} < 0.')
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % data_devices:
      raise ValueError(
        f'config.{key}={config[key]} is not divisible by the {data_devices} '
        f"devices of the mesh's 'data' axis; use a multiple of {data_devices}."
      )


class Dataset:
  """Global, sharded batches of one dataset for training and evaluation.

  Batches are dicts of jax.Arrays sharded with `sharding.batch_sharding`:
  'images' float32 (B, S, S, 3) in [-1, 1], 'labels' float32 (B, K) and, for
  evaluation, 'mask' float32 (B,). Each process reads its own shard of the
  data; the local_* methods give this process's rows as numpy arrays.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
  ):
    """Opens the dataset; see `get_dataset`."""
    self._config = config
    self._process_index = (
      jax.process_index() if process_index is None else process_index
    )
    self._process_count = (
      jax.process_count() if process_count is None else process_count
    )
    _check_config(config, mesh.shape[sharding.DATA])
    for key in ('batch_size', 'eval_batch_size'):
      pipeline.local_batch_size(config[key], self._process_count, key)
    self._sharding = sharding.batch_sharding(mesh)
    self._source = sources.open_source(
      config.dataset,
      splits=dict(config.splits),
      data_dir=config.data_dir,
      download=config.download,
      imagenet21k_name=config.imagenet21k_name,
    )

  @property
  def num_classes(self) -> int:
    return self._source.num_classes

  @property
  def class_names(self) -> list[str] | None:
    """Folder names, '0'..'9' for digits, a tfds label's names."""
    return self._source.class_names

  def split_files(self) -> dict[str, list[str]] | None:
    """{split: sorted file paths relative to the folder}, for a record.

    None where the examples are not files (digits, tfds datasets).
    """
    return self._source.split_files()

  def num_examples(self, split: str) -> int:
    """Size of a split ('train', 'val', 'test' or 'train_full')."""
    return self._source.num_examples(self._check_split(split))

  @property
  def steps_per_epoch(self) -> float:
    return self.num_examples('train') / self._config.batch_size

  def eval_steps(self, split: str = 'val') -> int:
    """Number of batches `eval_iter(split)` yields."""
    return pipeline.eval_steps(
      self._source,
      self._check_split(split),
      self._config.eval_batch_size,
      self._process_count,
    )

  def local_train_iter(
    self, start_step: int = 0, split: str = 'train'
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the training batches from `start_step`."""
    return pipeline.train_dataset(
      self._source,
      self._config,
      start_step=start_step,
      split=self._check_split(split),
      process_index=self._process_index,
      process_count=self._process_count,
    ).as_numpy_iterator()

  def local_eval_iter(
    self, split: str = 'val'
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the evaluation batches of a split."""
    return pipeline.eval_dataset(
      self._source,
      self._config,
      self._check_split(split),
      process_index=self._process_index,
      process_count=self._process_count,
    ).as_numpy_iterator()

  def train_iter(
    self, start_step: int = 0, split: str = 'train'
  ) -> Iterator[dict[str, jax.Array]]:
    """Endless global training batches; step k is the same in every run.

    Args:
      start_step: the first step served (resuming a run at this step).
      split: the split trained on: 'train', or 'train_full' for the final run
        after a hyperparameter sweep.

    Returns:
      Batches {'images', 'labels'} of config.batch_size examples.
    """
    batches = (
      pipeline.make_global(b, self._sharding, self._config.batch_size)
      for b in self.local_train_iter(start_step, split)
    )
    return pipeline.prefetch_to_device(batches, self._config.prefetch)

  def eval_iter(self, split: str = 'val') -> Iterator[dict[str, jax.Array]]:
    """Global batches {'images', 'labels', 'mask'} holding a split once.

    The last batch is padded with examples whose mask is 0.
    """
    batches = (
      pipeline.make_global(b, self._sharding, self._config.eval_batch_size)
      for b in self.local_eval_iter(split)
    )
    return pipeline.prefetch_to_device(batches, self._config.prefetch)

  def _check_split(self, split: str) -> str:
    if split not in SPLITS:
      raise ValueError(f'Unknown split {split!r}; use one of {list(SPLITS)}.')
    return split


def get_dataset(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Dataset:
  """Opens the dataset a config names.

  Args:
    config: a config with the keys of `config.default_config()`.
    mesh: the device mesh, with axes ('data', 'model').
    process_index: this process (jax.process_index() by default); tests set
      it to simulate several processes in one.
    process_count: number of processes (jax.process_count() by default).

  Returns:
    The dataset.
  """
  return Dataset(
    config, mesh, process_index=process_index, process_count=process_count
  )

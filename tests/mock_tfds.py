"""tfds.testing.mock_data serving examples made here.

tfds' random generator, with the fields a task's label depends on set by
hand; examples are serialized and read back through the builder's own
features, and every split reports N examples, so split slicing and process
shards work as on prepared data.
"""

import contextlib
import functools
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

N = 100  # ImageNet holds out 1% of train.


def _objects(objects, count):
  return {key: value[:count] for key, value in objects.items()}


_EXAMPLES = {}


def examples_of(name: str, features) -> list[dict]:
  """N raw examples of a builder, with controlled label fields."""
  if name not in _EXAMPLES:
    _EXAMPLES[name] = _make_examples(name, features)
  return _EXAMPLES[name]


def _make_examples(name: str, features) -> list[dict]:
  rng = np.random.default_rng(0)
  generator = mocking.RandomFakeGenerator(
    features, N, constant_dynamic_shape=True
  )
  examples = list(generator)
  for i, ex in enumerate(examples):
    if name == 'clevr':
      count = 3 + i % 8
      ex['objects'] = _objects(ex['objects'], count)
      # The closest object decides; spread it over all distance classes.
      closest = rng.uniform(7.5, 10.5)
      depths = closest + rng.uniform(0, 3, count) * (np.arange(count) > 0)
      ex['objects']['pixel_coords'][:, 2] = rng.permutation(depths)
    elif name == 'kitti':
      count = 1 + i % 4
      ex['objects'] = _objects(ex['objects'], count)
      ex['objects']['type'] = rng.integers(0, 8, count)
      ex['objects']['location'][:, 2] = rng.uniform(0, 30, count)
      ex['objects']['bbox'] = np.tile([0.1, 0.2, 0.3, 0.4], [count, 1])
    elif name == 'dsprites':
      ex['image'] = rng.integers(0, 2, (64, 64, 1), dtype=np.uint8)
    elif name == 'oxford_iiit_pet':
      ex['head_bbox'] = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
  return examples


def absolute_ranges(split, infos):
  if isinstance(split, str):
    split = tfds.core.ReadInstruction.from_spec(split)
  return [(i.splitname, i.from_ or 0, i.to) for i in split.to_absolute(infos)]


def _as_dataset(
  self, split, decoders=None, read_config=None, shuffle_files=False
):
  """A builder's examples in a split, read back through its features."""
  del read_config, shuffle_files
  features = self.info.features
  examples = examples_of(self.name, features)
  rows = [
    ex
    for _, a, b in absolute_ranges(split, self.info.splits)
    for ex in examples[a:b]
  ]
  serialized = [features.serialize_example(ex) for ex in rows]
  return tf.data.Dataset.from_tensor_slices(serialized).map(
    functools.partial(features.deserialize_example, decoders=decoders)
  )


@contextlib.contextmanager
def mocked_tfds():
  splits = tfds.core.SplitDict(
    [
      tfds.core.SplitInfo(name=name, shard_lengths=[N], num_bytes=0)
      for name in ('train', 'validation', 'test', 'full')
    ]
  )
  with (
    tfds.testing.mock_data(
      policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=_as_dataset
    ),
    mock.patch.object(
      tfds.core.DatasetInfo,
      'splits',
      new_callable=mock.PropertyMock,
      return_value=splits,
    ),
  ):
    yield

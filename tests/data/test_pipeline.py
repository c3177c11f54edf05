"""Batches: exactly-once evaluation, resumable training, sharding.

Images in the folders and the tfds dataset made here are single colours that
encode an example id (red + 256 * green), which survives cropping, resizing
and flipping, so a batch tells which examples it holds.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vit_jax import data, sharding


def _colour(example_id: int) -> list[int]:
  return [example_id % 256, example_id // 256, 7]


def _ids(images: np.ndarray) -> np.ndarray:
  """Example ids of a batch of single-colour images."""
  pixels = np.round((images[:, 0, 0, :2] + 1) * 127.5).astype(int)
  return pixels[:, 0] + 256 * pixels[:, 1]


class VitDataTestColours(tfds.core.GeneratorBasedBuilder):
  """23 train and 11 test single-colour images, 3 classes."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    features = tfds.features.FeaturesDict(
      {
        'image': tfds.features.Image(shape=(8, 8, 3)),
        'label': tfds.features.ClassLabel(num_classes=3),
      }
    )
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
      'train': self._generate_examples(range(23)),
      'test': self._generate_examples(range(100, 111)),
    }

  def _generate_examples(self, ids):
    for i in ids:
      image = np.full((8, 8, 3), _colour(i), np.uint8)
      yield i, {'image': image, 'label': i % 3}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder(
    'vit_data_test_colours', data_dir=data_dir
  ).download_and_prepare()
  return data_dir


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """train: 3 classes of 5, 4 and 4 images; test: 3 classes of 3 images.

  The 13 training images are train_full; val is cut from them.
  """
  root = tmp_path_factory.mktemp('folder')
  example_id = 0
  for split, counts in (('train', (5, 4, 4)), ('test', (3, 3, 3))):
    for label, count in enumerate(counts):
      (root / split / f'class{label}').mkdir(parents=True)
      for _ in range(count):
        image = np.full((8, 8, 3), _colour(example_id), np.uint8)
        path = root / split / f'class{label}' / f'{example_id}.png'
        Image.fromarray(image).save(path)
        example_id += 1
  return str(root)


@pytest.fixture(scope='module')
def textured(tmp_path_factory):
  """Textured images for augmentation to act on."""
  root = tmp_path_factory.mktemp('textured')
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for label in range(2):
      (root / split / f'class{label}').mkdir(parents=True)
      for i in range(6):
        image = rng.integers(0, 256, (16, 16, 3), np.uint8)
        path = root / split / f'class{label}' / f'{i}.jpg'
        Image.fromarray(image).save(path)
  return str(root)


@pytest.fixture(scope='module')
def mesh():
  return sharding.create_mesh(data=8, model=1)


def _config(dataset, **overrides):
  config = data.default_config()
  config.dataset = dataset
  config.image_size = 8
  config.batch_size = 8
  config.eval_batch_size = 8
  config.shuffle_buffer = 5
  config.update(overrides)
  return config


def _seen(batches):
  """(ids, labels) of the real examples in a list of eval batches."""
  ids = np.concatenate([_ids(b['images'])[b['mask'] > 0] for b in batches])
  labels = np.concatenate([b['labels'][b['mask'] > 0] for b in batches])
  return ids, labels.argmax(1)


@pytest.mark.parametrize('process_count', [1, 2])
def test_folder_eval_sees_every_example_once(folder, mesh, process_count):
  config = _config(folder)
  per_process = []
  for p in range(process_count):
    ds = data.get_dataset(
      config, mesh, process_index=p, process_count=process_count
    )
    per_process.append(list(ds.local_eval_iter('train_full')))
    assert len(per_process[-1]) == ds.eval_steps('train_full')
  # Every process serves the same number of batches of the local size.
  assert len({len(b) for b in per_process}) == 1
  for batches in per_process:
    for batch in batches:
      assert batch['images'].shape == (8 // process_count, 8, 8, 3)
      assert batch['mask'].shape == (8 // process_count,)
  ids, labels = _seen([b for batches in per_process for b in batches])
  masks = np.concatenate([b['mask'] for bs in per_process for b in bs])
  assert masks.sum() == 13
  np.testing.assert_array_equal(np.sort(ids), np.arange(13))
  # Ids 0-4 are class0, 5-8 class1, 9-12 class2.
  np.testing.assert_array_equal(labels, np.digitize(ids, [5, 9]))


@pytest.mark.parametrize('process_count', [1, 2])
def test_tfds_eval_sees_every_example_once(tfds_dir, mesh, process_count):
  config = _config('vit_data_test_colours', data_dir=tfds_dir)
  per_process = [
    list(
      data.get_dataset(
        config, mesh, process_index=p, process_count=process_count
      ).local_eval_iter('test')
    )
    for p in range(process_count)
  ]
  assert {len(batches) for batches in per_process} == {2}
  ids, labels = _seen([b for batches in per_process for b in batches])
  np.testing.assert_array_equal(np.sort(ids), np.arange(100, 111))
  np.testing.assert_array_equal(labels, ids % 3)


def test_a_process_without_examples_pads_in_step(tfds_dir, mesh):
  config = _config('vit_data_test_colours', data_dir=tfds_dir)
  config.splits.test = 'test[:1]'
  per_process = [
    list(
      data.get_dataset(
        config, mesh, process_index=p, process_count=2
      ).local_eval_iter('test')
    )
    for p in range(2)
  ]
  assert [len(batches) for batches in per_process] == [1, 1]
  assert [batches[0]['mask'].sum() for batches in per_process] == [1, 0]


def test_global_eval_batches_are_padded_and_masked(mesh):
  config = _config('digits', eval_batch_size=64)
  ds = data.get_dataset(config, mesh)
  batches = list(ds.eval_iter('test'))
  assert len(batches) == 6  # 360 examples: 5 full batches and one of 40.
  for batch in batches:
    assert batch['images'].shape == (64, 8, 8, 3)
    assert batch['images'].sharding == sharding.batch_sharding(mesh)
  masks = np.stack([np.asarray(b['mask']) for b in batches])
  assert masks.sum() == 360
  np.testing.assert_array_equal(masks[-1], np.arange(64) < 40)
  padding = np.asarray(batches[-1]['labels'])[40:]
  np.testing.assert_array_equal(padding, 0)


def _first(iterator, n):
  return [
    {k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(n)
  ]


def _assert_resumes(ds, start, steps):
  full = _first(ds.train_iter(), start + steps)
  resumed = _first(ds.train_iter(start_step=start), steps)
  for expected, actual in zip(full[start:], resumed, strict=True):
    np.testing.assert_array_equal(actual['images'], expected['images'])
    np.testing.assert_array_equal(actual['labels'], expected['labels'])
  # Consecutive batches differ: the stream moves on.
  assert not np.array_equal(full[0]['images'], full[1]['images'])


def _augmented(dataset, **overrides):
  config = _config(dataset, **overrides)
  config.pp.update(
    train_crop='inception', flip=True, mixup_alpha=0.2, randaugment_layers=2
  )
  return config


def test_digits_stream_resumes_with_its_augmentation(mesh):
  # 1,293 train images at 64 a batch: step 19 is in the second epoch.
  ds = data.get_dataset(_augmented('digits', batch_size=64), mesh)
  _assert_resumes(ds, start=19, steps=3)


def test_folder_stream_resumes_with_its_augmentation(textured, mesh):
  ds = data.get_dataset(_augmented(textured), mesh)
  _assert_resumes(ds, start=4, steps=3)


def test_tfds_stream_resumes_within_and_across_epochs(tfds_dir, mesh):
  ds = data.get_dataset(
    _augmented('tfds:vit_data_test_colours', data_dir=tfds_dir), mesh
  )
  # 23 examples a epoch, 8 a step: step 4 starts 9 records into epoch 1.
  _assert_resumes(ds, start=4, steps=4)


@pytest.mark.parametrize('source', ['folder', 'tfds'])
def test_each_epoch_is_a_new_permutation(folder, tfds_dir, mesh, source):
  if source == 'folder':
    config, n = _config(folder), 13
  else:
    # A buffer as large as the data shuffles each epoch completely.
    config = _config('vit_data_test_colours', data_dir=tfds_dir)
    config.shuffle_buffer, n = 100, 23
  ds = data.get_dataset(config, mesh)
  steps = 3 * n // 8 + 1
  batches = _first(ds.train_iter(split='train_full'), steps)
  ids = np.concatenate([_ids(b['images']) for b in batches])
  epochs = [ids[e * n : (e + 1) * n] for e in range(3)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize('source', ['folder', 'digits'])
def test_global_batches_do_not_depend_on_the_process_count(
  folder, mesh, source
):
  """Random-access sources: 2 processes' rows make the 1-process batches."""
  config = _config(folder if source == 'folder' else 'digits')
  config.pp.train_crop = 'inception'
  config.pp.flip = True
  single = _first(data.get_dataset(config, mesh).local_train_iter(3), 4)
  halves = [
    _first(
      data.get_dataset(
        config, mesh, process_index=p, process_count=2
      ).local_train_iter(3),
      4,
    )
    for p in range(2)
  ]
  for step in range(4):
    for key in ('images', 'labels'):
      np.testing.assert_array_equal(
        np.concatenate([halves[0][step][key], halves[1][step][key]]),
        single[step][key],
      )


def test_mesh_2x4_gets_the_right_rows(mesh):
  mesh_2x4 = sharding.create_mesh(data=2, model=4)
  ds = data.get_dataset(_config('digits'), mesh_2x4)
  batch = next(ds.train_iter())
  local = next(ds.local_train_iter())
  for key in ('images', 'labels'):
    array = batch[key]
    whole = np.asarray(array)
    np.testing.assert_array_equal(whole, local[key])
    assert len(array.addressable_shards) == 8
    for shard in array.addressable_shards:
      # The device's position along 'data'; along 'model' rows repeat.
      row = np.argwhere(mesh_2x4.devices == shard.device)[0][0]
      np.testing.assert_array_equal(
        np.asarray(shard.data), whole[4 * row : 4 * (row + 1)]
      )


def test_prefetch_keeps_the_order(mesh):
  config = _config('digits')
  without = data.get_dataset(_config('digits', prefetch=0), mesh)
  with_prefetch = data.get_dataset(config, mesh)
  for a, b in zip(
    _first(without.train_iter(), 4),
    _first(with_prefetch.train_iter(), 4),
    strict=True,
  ):
    np.testing.assert_array_equal(a['images'], b['images'])


def test_training_on_train_full(folder, mesh):
  # The final run after a sweep trains on all training data.
  config = _config(folder)
  config.splits.update(train='train[:6]', val='train[6:]')
  ds = data.get_dataset(config, mesh)
  assert ds.num_examples('train') == 6 and ds.num_examples('train_full') == 13
  sweep = _first(ds.train_iter(), 1)[0]
  final = _first(ds.train_iter(split='train_full'), 2)
  assert len(set(_ids(sweep['images']))) == 6
  ids = np.concatenate([_ids(b['images']) for b in final])
  np.testing.assert_array_equal(np.sort(ids[:13]), np.arange(13))

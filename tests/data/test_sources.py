"""Tests of the data sources: digits, tfds errors, splits, config keys.

Image folders are tested in test_data_folders.py.
"""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from helpers import small_data_config
from vit_jax import data, sharding
from vit_jax.data import config as data_config
from vit_jax.data import presets, sources


@pytest.fixture(scope='module')
def mesh():
  return sharding.create_mesh(data=8, model=1)


def _eval_images(ds, split):
  images = [
    batch['images'][batch['mask'] > 0] for batch in ds.local_eval_iter(split)
  ]
  return np.concatenate(images)


def test_digits_is_the_real_scikit_learn_data(mesh):
  ds = data.get_dataset(small_data_config(), mesh)
  assert ds.num_classes == 10
  assert ds.class_names == [str(d) for d in range(10)]
  assert ds.num_examples('train_full') + ds.num_examples('test') == 1797
  assert ds.num_examples('test') == 360
  assert ds.num_examples('train') + ds.num_examples('val') == 1437

  train, test = _eval_images(ds, 'train_full'), _eval_images(ds, 'test')
  assert train.shape == (1437, 8, 8, 3) and test.shape == (360, 8, 8, 3)
  assert train.min() >= -1 and train.max() <= 1
  # At 8x8 the resize is the identity: the images are the scans, grey tiled
  # to RGB, 0..16 scaled to 0..255, each exactly once over train and test.
  digits = sk_datasets.load_digits()
  expected = np.round(digits.images * 255 / 16) / 127.5 - 1
  pixels = np.round((np.concatenate([train, test]) + 1) * 127.5)
  np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
  assert sorted(map(bytes, pixels[..., 0].astype(np.uint8))) == sorted(
    map(bytes, np.round((expected + 1) * 127.5).astype(np.uint8))
  )
  # The split is stratified: each class has about 20% of its scans in test.
  test_labels = np.concatenate(
    [b['labels'][b['mask'] > 0] for b in ds.local_eval_iter('test')]
  ).argmax(1)
  np.testing.assert_allclose(
    np.bincount(test_labels), np.bincount(digits.target) * 0.2, atol=1
  )


def test_missing_tfds_data_fails_fast_and_says_how_to_prepare(tmp_path, mesh):
  start = time.monotonic()
  with pytest.raises(data.DatasetNotPreparedError) as error:
    data.get_dataset(
      small_data_config(dataset='cifar10', data_dir=str(tmp_path)), mesh
    )
  assert time.monotonic() - start < 10
  message = str(error.value)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert f'tfds build cifar10 --data_dir={tmp_path}' in message
  assert 'config.download=True' in message


@pytest.mark.parametrize(
  ('name', 'suggestion'),
  [
    ('imagenet2021', 'imagenet2012'),
    ('vtab/clevr_count', 'vtab/clevr_count_all'),
  ],
)
def test_unknown_dataset_names_close_presets(mesh, name, suggestion):
  with pytest.raises(ValueError, match=f'Unknown dataset.*{suggestion}'):
    data.get_dataset(small_data_config(dataset=name), mesh)


def test_batch_sizes_must_divide_over_devices_and_processes(mesh):
  with pytest.raises(ValueError, match="8 devices of the mesh's 'data'"):
    data.get_dataset(small_data_config(batch_size=12), mesh)
  with pytest.raises(ValueError, match='eval_batch_size=60'):
    data.get_dataset(small_data_config(eval_batch_size=60), mesh)
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    data.get_dataset(
      small_data_config(), mesh, process_index=0, process_count=3
    )


def test_vtab_splits_on_real_split_sizes():
  # caltech101 has 3,060 train images: val is train[90%:] = train[2754:].
  infos = {
    'train': tfds.core.SplitInfo(
      name='train', shard_lengths=[3060], num_bytes=0
    ),
    'test': tfds.core.SplitInfo(name='test', shard_lengths=[6084], num_bytes=0),
  }
  splits = presets.PRESETS['vtab/caltech101'].splits
  resolved = {k: sources.resolve_split(v, infos) for k, v in splits.items()}
  assert resolved == {
    'train': 'train[0:800]',
    'val': 'train[2754:2954]',
    'test': 'test',
    'train_full': 'train[0:800]+train[2754:2954]',
  }


def test_list_presets_has_every_vtab_task():
  names = data.list_presets()
  vtab = [n for n in names if n.startswith('vtab/')]
  assert len(vtab) == 19
  grouped = [f'vtab/{t}' for g in presets.VTAB_GROUPS.values() for t in g]
  assert sorted(grouped) == sorted(vtab)
  for name in ('digits', 'imagenet2012', 'imagenet2012_real', 'imagenet21k'):
    assert name in names
  for name in ('cifar10', 'cifar100', 'oxford_iiit_pet', 'oxford_flowers102'):
    assert name in names


def test_default_config_has_the_documented_keys():
  config = data.default_config()
  assert sorted(config) == sorted(
    [
      'dataset',
      'data_dir',
      'download',
      'splits',
      'image_size',
      'batch_size',
      'eval_batch_size',
      'seed',
      'loss',
      'pp',
      'shuffle_buffer',
      'prefetch',
      'imagenet21k_name',
    ]
  )
  assert sorted(config.splits) == sorted(data_config.SPLITS)
  assert dict(config.pp) == {
    'train_crop': 'inception',
    'min_area': 0.05,
    'flip': True,
    'eval_crop': 'resize',
    'mixup_alpha': 0.0,
    'randaugment_layers': 0,
    'randaugment_magnitude': 10,
    'augreg': None,
  }
  assert config.dataset == 'digits' and config.download is False
  config.splits.val = 'train[90%:]'  # Each split is its own field.
  assert config.splits.train is None

"""The tfds presets on mock data: splits, label functions, preprocessing.

tfds.testing.mock_data serves examples made here (tfds' random generator,
with the fields a task's label depends on set by hand), serialized and read
back through the builder's own features, and reports N examples in every
split, so split slicing and process shards work as on prepared data.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mock_tfds import absolute_ranges, examples_of, mocked_tfds
from vit_jax import data, sharding
from vit_jax.data import config as data_config
from vit_jax.data import presets

# Classes per task, from the VTAB-1k task definitions.
NUM_CLASSES = {
  'cifar10': 10,
  'imagenet2012': 1000,
  'imagenet2012_real': 1000,
  'vtab/caltech101': 102,
  'vtab/cifar100': 100,
  'vtab/dtd': 47,
  'vtab/oxford_flowers102': 102,
  'vtab/oxford_iiit_pet': 37,
  'vtab/sun397': 397,
  'vtab/svhn': 10,
  'vtab/patch_camelyon': 2,
  'vtab/eurosat': 10,
  'vtab/resisc45': 45,
  'vtab/diabetic_retinopathy': 5,
  'vtab/clevr_count_all': 8,
  'vtab/clevr_closest_object_distance': 6,
  'vtab/dmlab': 6,
  'vtab/kitti_closest_vehicle_distance': 4,
  'vtab/dsprites_location': 16,
  'vtab/dsprites_orientation': 16,
  'vtab/smallnorb_azimuth': 18,
  'vtab/smallnorb_elevation': 9,
}


def _expected_label(name: str, ex: dict):
  """The label of a raw example, from the VTAB-1k task definitions."""
  task = name.removeprefix('vtab/')
  if task == 'clevr_count_all':
    return len(ex['objects']['size']) - 3
  if task == 'clevr_closest_object_distance':
    depth = np.float32(min(ex['objects']['pixel_coords'][:, 2]))
    bins = [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0]
    return max(i for i, t in enumerate(bins) if t < depth)
  if task == 'kitti_closest_vehicle_distance':
    objects = ex['objects']
    depths = [
      z
      for t, z in zip(objects['type'], objects['location'][:, 2], strict=True)
      if t < 3
    ]
    depth = np.float32(min([*depths, 1000.0]))
    return max(i for i, t in enumerate([-100.0, 8.0, 20.0, 999.0]) if t < depth)
  if task == 'dsprites_location':
    return ex['label_x_position'] // 2
  if task == 'dsprites_orientation':
    return int(ex['label_orientation'] // 2.5)
  if task.startswith('smallnorb_'):
    return ex[f'label_{task.removeprefix("smallnorb_")}']
  return ex['label']


def _test_examples(name: str, builder):
  """The raw examples of a preset's test split, in order."""
  spec = presets.PRESETS[name].splits['test']
  examples = examples_of(builder.name, builder.info.features)
  return [
    ex
    for _, a, b in absolute_ranges(spec, builder.info.splits)
    for ex in examples[a:b]
  ]


@pytest.fixture(scope='module')
def mesh():
  return sharding.create_mesh(data=8, model=1)


@pytest.mark.parametrize('name', sorted(NUM_CLASSES))
def test_preset_on_mock_data(name, mesh):
  config = data.default_config()
  config.dataset = name
  config.image_size = 64 if 'dsprites' in name else 8
  config.batch_size = 8
  config.eval_batch_size = 16
  config.loss = 'sigmoid_xent'
  with mocked_tfds():
    ds = data.get_dataset(config, mesh)
    preset = presets.PRESETS[name]
    test_builder = tfds.builder(
      preset.split_tfds_names.get('test', preset.tfds_name)
    )
    examples = _test_examples(name, test_builder)
    batches = list(ds.local_eval_iter('test'))
    train = next(ds.local_train_iter())
    sizes = {split: ds.num_examples(split) for split in data_config.SPLITS}

  k = NUM_CLASSES[name]
  assert ds.num_classes == k
  assert sizes['test'] == len(examples)
  if name.startswith('vtab/'):
    assert sizes['train_full'] == sizes['train'] + sizes['val']
  assert train['images'].shape == (8, config.image_size, config.image_size, 3)
  assert train['labels'].shape == (8, k)
  np.testing.assert_array_equal(train['labels'].sum(1), 1)

  mask = np.concatenate([b['mask'] for b in batches]) > 0
  labels = np.concatenate([b['labels'] for b in batches])[mask]
  images = np.concatenate([b['images'] for b in batches])[mask]
  assert mask.sum() == len(examples)
  assert images.min() >= -1 and images.max() <= 1
  if name == 'imagenet2012_real':
    expected = np.zeros((len(examples), k))
    for row, ex in enumerate(examples):
      expected[row, ex['real_label']] = 1
    np.testing.assert_array_equal(labels, expected)
  else:
    np.testing.assert_array_equal(labels.sum(1), 1)  # One class, in range.
    expected = [_expected_label(name, ex) for ex in examples]
    np.testing.assert_array_equal(labels.argmax(1), expected)
  if 'dsprites' in name:
    # 0/1 masks become black and white RGB images.
    masks = np.stack([ex['image'] for ex in examples])
    np.testing.assert_array_equal(images, np.repeat(masks * 2.0 - 1, 3, -1))


def test_mock_tfds_stream_resumes_across_epochs(mesh):
  config = data.default_config()
  config.dataset = 'cifar10'
  config.image_size = 8
  config.batch_size = 8
  config.shuffle_buffer = 16
  config.pp.mixup_alpha = 0.2
  with mocked_tfds():
    ds = data.get_dataset(config, mesh)
    # 98 train examples: step 12 holds the end of epoch 0 and the start of 1.
    full = ds.local_train_iter()
    expected = [next(full) for _ in range(15)][11:]
    resumed = ds.local_train_iter(start_step=11)
    actual = [next(resumed) for _ in range(4)]
  for a, b in zip(actual, expected, strict=True):
    np.testing.assert_array_equal(a['images'], b['images'])
    np.testing.assert_array_equal(a['labels'], b['labels'])

"""Preprocessing: crops, labels, mixup and RandAugment in the pipeline."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vit_jax import data, sharding
from vit_jax.data import preprocess


def _key(i):
  return preprocess.key_for(0, i)


def _image(shape=(16, 16, 3), low=30, high=220, seed=0):
  return np.random.default_rng(seed).integers(low, high, shape, np.uint8)


def test_inception_crop_area_and_aspect_ratio():
  image = _image((120, 90, 3))
  jpeg = io.BytesIO()
  Image.fromarray(image).save(jpeg, format='JPEG', quality=95)
  for i in range(20):
    crop = preprocess.inception_crop(tf.constant(image), _key(i), 0.3).numpy()
    h, w, _ = crop.shape
    assert 0.3 * 120 * 90 * 0.95 <= h * w <= 120 * 90
    assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # The JPEG path decodes only the window: the same window is cut.
    from_jpeg = preprocess.inception_crop(
      tf.constant(jpeg.getvalue()), _key(i), 0.3
    ).numpy()
    assert from_jpeg.shape == crop.shape


def test_central_crop_keeps_the_centre():
  # Left half black, right half white, 40x80: the short side becomes 16, the
  # long 32, and the central 14x14 is half black, half white.
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 40:] = 255
  crop = preprocess.central_crop(tf.constant(image), 14).numpy()
  assert crop.shape == (14, 14, 3)
  np.testing.assert_allclose(crop[:, :6], 0)
  np.testing.assert_allclose(crop[:, 8:], 255)


def test_labels_for_softmax_and_sigmoid():
  one = preprocess.labels(tf.constant(2, tf.int64), 4, 'softmax_xent')
  np.testing.assert_array_equal(one, [0, 0, 1, 0])
  ids = tf.constant([3, 1, 3], tf.int64)
  np.testing.assert_array_equal(
    preprocess.labels(ids, 4, 'sigmoid_xent'), [0, 1, 0, 1]
  )
  np.testing.assert_array_equal(
    preprocess.labels(ids, 4, 'softmax_xent'), [0, 0.5, 0, 0.5]
  )
  empty = tf.zeros([0], tf.int64)
  np.testing.assert_array_equal(preprocess.labels(empty, 4, 'softmax_xent'), 0)


@pytest.fixture(scope='module')
def mesh():
  return sharding.create_mesh(data=8, model=1)


def _digits(**pp):
  config = data.default_config()
  config.image_size = 16
  config.batch_size = 16
  config.pp.update(pp)
  return config


def test_mixup_mixes_each_batch_with_itself_rolled(mesh):
  plain = data.get_dataset(_digits(mixup_alpha=0.0), mesh).local_train_iter()
  mixed = data.get_dataset(_digits(mixup_alpha=0.4), mesh).local_train_iter()
  ratios = []
  for _ in range(4):
    x, m = next(plain), next(mixed)
    assert m['images'].shape == (16, 16, 16, 3)
    assert m['images'].min() >= -1 and m['images'].max() <= 1
    # The mixed labels give the ratio; the images must follow it.
    labels, rolled = x['labels'], np.roll(x['labels'], 1, axis=0)
    diff = (labels - rolled).ravel()
    ratio = np.dot(m['labels'].ravel() - rolled.ravel(), diff) / diff.dot(diff)
    # As in big_vision, each example keeps the larger share.
    assert 0.5 <= ratio <= 1
    np.testing.assert_allclose(
      m['labels'], ratio * labels + (1 - ratio) * rolled, atol=1e-6
    )
    images = x['images']
    np.testing.assert_allclose(
      m['images'],
      ratio * images + (1 - ratio) * np.roll(images, 1, axis=0),
      atol=1e-5,
    )
    ratios.append(ratio)
  assert len(set(np.round(ratios, 5))) == 4  # A new ratio every step.


def test_randaugment_batches_in_range(mesh):
  plain = next(data.get_dataset(_digits(), mesh).local_train_iter())
  config = _digits(randaugment_layers=2, randaugment_magnitude=15)
  augmented = next(data.get_dataset(config, mesh).local_train_iter())
  assert augmented['images'].shape == (16, 16, 16, 3)
  assert augmented['images'].dtype == np.float32
  assert augmented['images'].min() >= -1 and augmented['images'].max() <= 1
  np.testing.assert_array_equal(augmented['labels'], plain['labels'])
  changed = np.abs(augmented['images'] - plain['images']).max(axis=(1, 2, 3))
  assert (changed > 0.01).sum() >= 12


# big_vision's configs/vit_i1k.py: pp 'randaug(2, M)' and mixup p.
@pytest.mark.parametrize(
  ('name', 'layers', 'magnitude', 'mixup_p'),
  [
    ('none', 0, 0, 0.0),
    ('light1', 2, 0, 0.0),
    ('light2', 2, 10, 0.2),
    ('medium1', 2, 15, 0.2),
    ('medium2', 2, 15, 0.5),
    ('strong1', 2, 20, 0.5),
    ('strong2', 2, 20, 0.8),
  ],
)
def test_augreg_settings(name, layers, magnitude, mixup_p):
  pp = _digits(augreg=name).pp
  resolved = preprocess.resolve_augreg(pp)
  assert resolved.randaugment_layers == layers
  assert resolved.randaugment_magnitude == magnitude
  assert resolved.mixup_alpha == mixup_p
  assert pp.randaugment_layers == 0  # The config itself is left alone.


def test_augreg_trains_as_its_spelled_out_keys(mesh):
  named = data.get_dataset(_digits(augreg='medium1'), mesh)
  spelled = _digits(
    randaugment_layers=2, randaugment_magnitude=15, mixup_alpha=0.2
  )
  a = next(named.local_train_iter(3))
  b = next(data.get_dataset(spelled, mesh).local_train_iter(3))
  np.testing.assert_array_equal(a['images'], b['images'])
  np.testing.assert_array_equal(a['labels'], b['labels'])
  # Mixup is on: labels are not one-hot.
  assert (a['labels'].max(1) < 1).any()


def test_augreg_errors(mesh):
  with pytest.raises(ValueError, match=r"pp\.augreg='medium3'.*'medium2'"):
    data.get_dataset(_digits(augreg='medium3'), mesh)
  with pytest.raises(ValueError, match=r'leave config\.pp\.randaugment_layers'):
    data.get_dataset(_digits(augreg='light1', randaugment_layers=2), mesh)
  with pytest.raises(ValueError, match=r'config\.pp\.mixup_alpha at 0'):
    data.get_dataset(_digits(augreg='light1', mixup_alpha=0.2), mesh)

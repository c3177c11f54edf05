"""Preprocessing ops: crops, labels, mixup and RandAugment."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from vit_jax import data, sharding
from vit_jax.data import preprocess, randaugment


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
    assert 0 <= ratio <= 1
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


def test_randaugment_is_a_function_of_its_key():
  image = tf.constant(_image())
  outputs = [randaugment.randaugment(image, _key(i), 2, 10) for i in range(8)]
  for out in outputs:
    assert out.shape == (16, 16, 3) and out.dtype == tf.uint8
  again = randaugment.randaugment(image, _key(3), 2, 10)
  np.testing.assert_array_equal(again, outputs[3])
  assert len({out.numpy().tobytes() for out in outputs}) >= 6


@pytest.mark.parametrize(
  ('op', 'level', 'reference'),
  [
    (randaugment.invert, 1.0, ImageOps.invert),
    (randaugment.auto_contrast, 1.0, ImageOps.autocontrast),
    (randaugment.equalize, 1.0, ImageOps.equalize),
    # Magnitude 5 solarizes from 128 up; magnitude 10 keeps 4 bits.
    (randaugment.solarize, 0.5, lambda im: ImageOps.solarize(im, 128)),
    (randaugment.posterize, 1.0, lambda im: ImageOps.posterize(im, 4)),
  ],
)
def test_colour_ops_match_pil(op, level, reference):
  image = _image((12, 10, 3))
  expected = np.asarray(reference(Image.fromarray(image)))
  actual = op(tf.constant(image), tf.constant(level), _key(0)).numpy()
  np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize(
  'op',
  [
    randaugment.rotate,
    randaugment.shear_x,
    randaugment.shear_y,
    randaugment.translate_x,
    randaugment.translate_y,
  ],
)
def test_geometric_ops_at_magnitude_zero_are_the_identity(op):
  image = _image()
  actual = op(tf.constant(image), tf.constant(0.0), _key(1)).numpy()
  np.testing.assert_array_equal(actual, image)


def test_translate_moves_by_the_magnitude_and_fills_grey():
  image = _image()
  # 16 px wide: at magnitude m the shift is round(m/10 * 100/224 * 16) px.
  level = 4 / (100 / 224 * 16)
  right = np.full_like(image, 128)
  right[:, 4:] = image[:, :-4]
  left = np.full_like(image, 128)
  left[:, :-4] = image[:, 4:]
  shifts = set()
  for i in range(8):
    out = randaugment.translate_x(
      tf.constant(image), tf.constant(level), _key(i)
    )
    out = out.numpy()
    assert np.array_equal(out, right) or np.array_equal(out, left)
    shifts.add(np.array_equal(out, right))
  assert shifts == {True, False}  # Both directions occur.

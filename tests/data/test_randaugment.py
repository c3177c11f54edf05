"""RandAugment against the reference's formulas, written here in numpy.

The reference is big_vision's randaug (autoaugment.py, the same as TF Model
Garden's augment.py). Each op is checked at several magnitudes, 0, 10 and 15
among them, on small fixed images chosen so that no value lies within float
rounding of an integer where the reference truncates.
"""

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from vit_jax.data import preprocess
from vit_jax.data import randaugment as ra

MAGNITUDES = (0, 2, 5, 7, 10, 15, 20)
# Luma weights of tf.image.rgb_to_grayscale, which the reference uses.
_LUMA = np.array([0.2989, 0.5870, 0.1140])


def _key(i):
  return preprocess.key_for(0, i)


def _grey_exact(image):
  """tf.image.rgb_to_grayscale's value before it truncates, in float64."""
  return image.astype(np.float64) / 255 @ _LUMA * 255.5


def _image(shape=(12, 10, 3), seed=0):
  """Random pixels nudged away from the truncation boundaries of the luma
  and of the 3x3 smoothing filter (sums divisible by 13), so that exact
  formulas apply."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, shape, np.uint8)
  for _ in range(10_000):
    grey = _grey_exact(image)
    near = np.argwhere(np.abs(grey - np.round(grey)) < 1e-3)
    # The centre pixel of each bad sum, in image coordinates.
    bad = np.argwhere(_smooth_sums(image) % 13 == 0) + np.array([1, 1, 0])
    if not len(near) and not len(bad):
      return image
    y, x, *c = (near if len(near) else bad)[0]
    image[y, x, c[0] if c else 0] += 1
  raise AssertionError('no suitable image')


def _smooth_sums(image):
  """13 x PIL's SMOOTH filter on the interior pixels, exactly."""
  x = image.astype(np.int64)
  h, w = x.shape[:2]
  total = 4 * x[1:-1, 1:-1]
  for dy in range(3):
    for dx in range(3):
      total = total + x[dy : dy + h - 2, dx : dx + w - 2]
  return total


def _blend(degenerate, image, factor):
  """The reference's blend in float32: truncates, clips only extrapolation."""
  if factor == 0.0:
    return degenerate.astype(np.uint8)
  if factor == 1.0:
    return image
  d = degenerate.astype(np.float32)
  blended = d + np.float32(factor) * (image.astype(np.float32) - d)
  if not 0 < factor < 1:
    blended = np.clip(blended, 0, 255)
  return blended.astype(np.uint8)


def _factor(m):
  return m / 10 * 1.8 + 0.1


def _auto_contrast(x, m):
  out = x.copy()
  for c in range(3):
    channel = x[..., c].astype(np.float32)
    lo, hi = channel.min(), channel.max()
    if hi > lo:
      scale = np.float32(255) / (hi - lo)
      stretched = channel * scale + (-lo * scale)
      out[..., c] = np.clip(stretched, 0, 255).astype(np.uint8)
  return out


def _equalize(x, m):
  out = x.copy()
  for c in range(3):
    channel = x[..., c].astype(np.int64)
    histogram = np.bincount(channel.ravel(), minlength=256)
    present = histogram[histogram > 0]
    step = (present.sum() - present[-1]) // 255
    if step:
      lut = (np.cumsum(histogram) + step // 2) // step
      lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255)
      out[..., c] = lut[channel]
  return out


def _invert(x, m):
  return 255 - x


def _posterize(x, m):
  bits = int(m / 10 * 4)
  # The reference's shift 8 - bits becomes a uint8, clamped by TF to 7.
  shift = min((8 - bits) % 256, 7)
  return (x >> shift) << shift


def _solarize(x, m):
  # The reference's threshold becomes a uint8: it wraps around at 256.
  threshold = int(m / 10 * 256) % 256
  return np.where(x < threshold, x, 255 - x)


def _solarize_add(x, m):
  added = np.clip(x.astype(np.int64) + int(m / 10 * 110), 0, 255)
  return np.where(x < 128, added, x).astype(np.uint8)


def _color(x, m):
  grey = _grey_exact(x).astype(np.uint8)[..., None].repeat(3, -1)
  return _blend(grey, x, _factor(m))


def _contrast(x, m):
  # The reference's "mean" is the histogram's sum over 256: pixels / 256.
  h, w = x.shape[:2]
  mean = np.uint8(min(h * w / 256, 255))
  return _blend(np.full_like(x, mean), x, _factor(m))


def _brightness(x, m):
  return _blend(np.zeros_like(x), x, _factor(m))


def _sharpness(x, m):
  degenerate = x.copy()
  degenerate[1:-1, 1:-1] = _smooth_sums(x) // 13
  return _blend(degenerate, x, _factor(m))


COLOUR_OPS = {
  ra.auto_contrast: _auto_contrast,
  ra.equalize: _equalize,
  ra.invert: _invert,
  ra.posterize: _posterize,
  ra.solarize: _solarize,
  ra.solarize_add: _solarize_add,
  ra.color: _color,
  ra.contrast: _contrast,
  ra.brightness: _brightness,
  ra.sharpness: _sharpness,
}


@pytest.mark.parametrize('m', MAGNITUDES)
@pytest.mark.parametrize('op', COLOUR_OPS, ids=lambda op: op.__name__)
def test_colour_op_matches_the_reference_formula(op, m):
  # 16x16 so that Contrast's grey (256 pixels / 256 = 1) is not 0.
  for image in (_image(), _image((16, 16, 3), seed=1)):
    expected = COLOUR_OPS[op](image, m)
    actual = op(tf.constant(image), float(m), _key(0)).numpy()
    np.testing.assert_array_equal(actual, expected)


def test_colour_ops_on_a_flat_image():
  # One value per channel: AutoContrast and Equalize leave it unchanged.
  image = np.broadcast_to(np.uint8([30, 200, 90]), (8, 8, 3)).copy()
  for op in (ra.auto_contrast, ra.equalize):
    np.testing.assert_array_equal(op(tf.constant(image), 5.0, _key(0)), image)


@pytest.mark.parametrize('m', [0, 2, 5, 10, 15, 20, 25])
def test_posterize_and_solarize_are_the_reference_tf_expressions(m):
  """The reference's own TF code, with its Python-int arguments."""
  image = tf.constant(np.arange(256, dtype=np.uint8).reshape(16, 16, 1))
  image = tf.tile(image, [1, 1, 3])
  shift = 8 - int(m / 10 * 4)
  reference = tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)
  np.testing.assert_array_equal(ra.posterize(image, m, _key(0)), reference)
  threshold = int(m / 10 * 256)
  reference = tf.where(image < threshold, image, 255 - image)
  np.testing.assert_array_equal(ra.solarize(image, m, _key(0)), reference)


def _round_half_away(v):
  return np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))


def _warp(x, a0, a1, a2, b0, b1, b2):
  """Nearest-neighbour projective warp (output -> input), 128 outside."""
  h, w = x.shape[:2]
  ys, xs = np.meshgrid(
    np.arange(h, dtype=np.float32),
    np.arange(w, dtype=np.float32),
    indexing='ij',
  )
  f = np.float32
  in_x = _round_half_away(f(a0) * xs + f(a1) * ys + f(a2)).astype(int)
  in_y = _round_half_away(f(b0) * xs + f(b1) * ys + f(b2)).astype(int)
  inside = (in_x >= 0) & (in_x < w) & (in_y >= 0) & (in_y < h)
  out = np.full_like(x, 128)
  out[inside] = x[in_y[inside], in_x[inside]]
  return out


def _rotate(x, m, sign):
  angle = np.float32(sign * m / 10 * 30 * math.pi / 180)
  h, w = x.shape[0] - 1, x.shape[1] - 1
  cos, sin = np.cos(angle), np.sin(angle)
  x_offset = (w - (cos * w - sin * h)) / 2
  y_offset = (h - (sin * w + cos * h)) / 2
  return _warp(x, cos, -sin, x_offset, sin, cos, y_offset)


GEOMETRIC_OPS = {
  ra.rotate: _rotate,
  ra.shear_x: lambda x, m, s: _warp(x, 1, s * m / 10 * 0.3, 0, 0, 1, 0),
  ra.shear_y: lambda x, m, s: _warp(x, 1, 0, 0, s * m / 10 * 0.3, 1, 0),
  # Absolute pixels: 100 at magnitude 10, whatever the image size.
  ra.translate_x: lambda x, m, s: _warp(x, 1, 0, s * m / 10 * 100, 0, 1, 0),
  ra.translate_y: lambda x, m, s: _warp(x, 1, 0, 0, 0, 1, s * m / 10 * 100),
}


@pytest.mark.parametrize('m', [0, 3, 10, 15])
@pytest.mark.parametrize('op', GEOMETRIC_OPS, ids=lambda op: op.__name__)
def test_geometric_op_matches_the_reference_formula(op, m):
  # Large enough that 150 px translations leave some of the image.
  image = np.random.default_rng(2).integers(0, 128, (180, 170, 3), np.uint8)
  candidates = [GEOMETRIC_OPS[op](image, m, sign) for sign in (1, -1)]
  signs = set()
  for i in range(6):
    actual = op(tf.constant(image), float(m), _key(i)).numpy()
    matches = [np.array_equal(actual, c) for c in candidates]
    assert any(matches)
    signs.add(matches.index(True))
  if m:
    assert signs == {0, 1}  # Both directions occur.
  else:
    np.testing.assert_array_equal(candidates[0], image)


@pytest.mark.parametrize('m', [0, 2, 10, 15])
def test_cutout_greys_a_square_of_side_80m_over_10(m):
  image = np.random.default_rng(3).integers(0, 128, (100, 90, 3), np.uint8)
  pad = int(m / 10 * 40)
  centres = set()
  for i in range(6):
    actual = ra.cutout(tf.constant(image), float(m), _key(i)).numpy()
    grey = (actual != image).any(-1)
    assert (actual[grey] == 128).all()
    if not pad:
      assert not grey.any()
      continue
    rows, cols = np.nonzero(grey)
    # The square [c - pad, c + pad) around a pixel c, cut by the borders.
    top, left = rows.min(), cols.min()
    bottom, right = rows.max() + 1, cols.max() + 1
    row = top + pad if top > 0 else bottom - pad
    col = left + pad if left > 0 else right - pad
    assert 0 <= row < 100 and 0 <= col < 90
    expected = np.zeros_like(grey)
    expected[max(row - pad, 0) : row + pad, max(col - pad, 0) : col + pad] = 1
    np.testing.assert_array_equal(grey, expected)
    centres.add((row, col))
  assert len(centres) > 1 or not pad


def test_each_layer_applies_one_op_chosen_uniformly():
  image = tf.constant(_image((16, 16, 3)))
  for i in range(12):
    key = _key(i)
    expected = image
    for layer in range(3):
      index, arg_key = ra.layer_choice(key, layer)
      expected = ra.OPS[int(index)](expected, 15.0, arg_key)
    actual = ra.randaugment(image, key, 3, 15)
    np.testing.assert_array_equal(actual, expected)
  # The 16 ops are equally likely, in every layer.
  for layer in (0, 1):
    draws = [int(ra.layer_choice(_key(i), layer)[0]) for i in range(1600)]
    counts = np.bincount(draws, minlength=16)
    assert len(counts) == 16
    assert stats.chisquare(counts).pvalue > 1e-3
  assert len(ra.OPS) == 16 and len(set(ra.OPS)) == 16


def test_randaugment_is_a_function_of_its_key():
  image = tf.constant(_image((16, 16, 3)))
  outputs = [ra.randaugment(image, _key(i), 2, 10) for i in range(8)]
  for out in outputs:
    assert out.shape == (16, 16, 3) and out.dtype == tf.uint8
  again = ra.randaugment(image, _key(3), 2, 10)
  np.testing.assert_array_equal(again, outputs[3])
  assert len({out.numpy().tobytes() for out in outputs}) >= 6

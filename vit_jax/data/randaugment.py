"""RandAugment (Cubuk et al., 2020) on uint8 images, with stateless randomness.

Each layer applies one of 16 ops, drawn uniformly, at a fixed magnitude. The
ops and their magnitude scale follow the TPU reference implementation that
big_vision uses (magnitude 10 is the reference's maximum level; larger values
extrapolate), with two changes so that every op grows stronger with the
magnitude: Posterize keeps 8 - 4m/10 bits and Solarize inverts the pixels
above 256 - 256m/10 (the reference posterizes to 0 bits and solarizes nothing
at magnitude 0). Translation and cutout sizes are relative to the image
(the reference's 100 and 40 pixels at 224), so small images behave alike.
"""

import functools
import math

import tensorflow as tf

_FILL = 128
_TRANSLATE = 100 / 224
_CUTOUT = 40 / 224


def _split(key: tf.Tensor, num: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(key, num))


def _sign(key: tf.Tensor) -> tf.Tensor:
  coin = tf.random.stateless_uniform([], key)
  return tf.where(coin < 0.5, -1.0, 1.0)


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """degenerate + factor * (image - degenerate), in uint8."""
  degenerate = tf.cast(degenerate, tf.float32)
  image = tf.cast(image, tf.float32)
  return _to_uint8(degenerate + factor * (image - degenerate))


def _grey(image: tf.Tensor) -> tf.Tensor:
  """The luma of an RGB image, tiled to RGB (float32)."""
  weights = tf.constant([0.2989, 0.5870, 0.1140])
  luma = tf.round(tf.reduce_sum(tf.cast(image, tf.float32) * weights, -1))
  return tf.tile(luma[..., None], [1, 1, 3])


def _enhance_factor(level):
  return level * 1.8 + 0.1


def _transform(image: tf.Tensor, transform) -> tf.Tensor:
  """Projective transform (output pixel -> input pixel), 128 outside."""
  images = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=tf.cast(tf.stack(transform)[None], tf.float32),
    output_shape=tf.shape(image)[:2],
    fill_value=float(_FILL),
    interpolation='NEAREST',
    fill_mode='CONSTANT',
  )
  return images[0]


def auto_contrast(image, level, key):
  """Stretches each channel to the full 0..255 range."""
  del level, key
  image = tf.cast(image, tf.float32)
  low = tf.reduce_min(image, axis=[0, 1])
  high = tf.reduce_max(image, axis=[0, 1])
  scale = tf.math.divide_no_nan(255.0, high - low)
  stretched = tf.cast(tf.clip_by_value((image - low) * scale, 0, 255), tf.uint8)
  # Channels with a single value stay as they are (as in PIL).
  return tf.where(high > low, stretched, tf.cast(image, tf.uint8))


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  # PIL's algorithm: a lookup table from the cumulative histogram, with a
  # step that ignores the count of the largest value present.
  channel = tf.cast(channel, tf.int32)
  histogram = tf.histogram_fixed_width(channel, [0, 255], nbins=256)
  present = tf.boolean_mask(histogram, histogram > 0)
  step = (tf.reduce_sum(present) - present[-1]) // 255
  lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
  return tf.where(step > 0, tf.gather(lut, channel), channel)


def equalize(image, level, key):
  """Equalizes the histogram of each channel."""
  del level, key
  channels = [_equalize_channel(image[..., c]) for c in range(3)]
  return tf.cast(tf.stack(channels, -1), tf.uint8)


def invert(image, level, key):
  del level, key
  return 255 - image


def rotate(image, level, key):
  """Rotates by up to 30 degrees at magnitude 10, either way."""
  angle = _sign(key) * level * 30.0 * math.pi / 180.0
  shape = tf.cast(tf.shape(image), tf.float32)
  h, w = shape[0] - 1, shape[1] - 1
  cos, sin = tf.cos(angle), tf.sin(angle)
  x_offset = (w - (cos * w - sin * h)) / 2.0
  y_offset = (h - (sin * w + cos * h)) / 2.0
  return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


def posterize(image, level, key):
  """Keeps the 8 - 4m/10 high bits of each value (at least one)."""
  del key
  bits = tf.clip_by_value(8 - tf.floor(level * 4.0), 1.0, 8.0)
  shift = tf.cast(8 - bits, tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, level, key):
  """Inverts the values at or above 256 - 256m/10."""
  del key
  threshold = tf.clip_by_value(256.0 - level * 256.0, 0.0, 256.0)
  return tf.where(tf.cast(image, tf.float32) < threshold, image, 255 - image)


def solarize_add(image, level, key):
  """Adds 110m/10 to the values below 128."""
  del key
  added = _to_uint8(tf.cast(image, tf.float32) + tf.floor(level * 110.0))
  return tf.where(image < 128, added, image)


def color(image, level, key):
  del key
  return _blend(_grey(image), image, _enhance_factor(level))


def contrast(image, level, key):
  del key
  mean = tf.reduce_mean(_grey(image))
  return _blend(tf.fill(tf.shape(image), mean), image, _enhance_factor(level))


def brightness(image, level, key):
  del key
  return _blend(tf.zeros_like(image), image, _enhance_factor(level))


def sharpness(image, level, key):
  """Blends with PIL's smoothing filter; border pixels stay unchanged."""
  del key
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(
    tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], 'VALID'
  )[0]
  padding = [[1, 1], [1, 1], [0, 0]]
  smooth = tf.pad(tf.round(smooth), padding)
  inside = tf.pad(tf.ones_like(smooth[1:-1, 1:-1], tf.bool), padding)
  degenerate = tf.where(inside, smooth, tf.cast(image, tf.float32))
  return _blend(degenerate, image, _enhance_factor(level))


def shear_x(image, level, key):
  shear = _sign(key) * level * 0.3
  return _transform(image, [1.0, shear, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image, level, key):
  shear = _sign(key) * level * 0.3
  return _transform(image, [1.0, 0.0, 0.0, shear, 1.0, 0.0, 0.0, 0.0])


def translate_x(image, level, key):
  width = tf.cast(tf.shape(image)[1], tf.float32)
  pixels = tf.round(_sign(key) * level * _TRANSLATE * width)
  return _transform(image, [1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image, level, key):
  height = tf.cast(tf.shape(image)[0], tf.float32)
  pixels = tf.round(_sign(key) * level * _TRANSLATE * height)
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0])


def cutout(image, level, key):
  """Fills a square of side 2 * 40m/10 px (at 224 px) around a random point."""
  shape = tf.shape(image)
  size = tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
  pad = tf.cast(level * _CUTOUT * size, tf.int32)
  center = (
    tf.random.stateless_uniform(
      [2], key, minval=0, maxval=tf.int32.max, dtype=tf.int32
    )
    % shape[:2]
  )
  rows = tf.range(shape[0])[:, None]
  cols = tf.range(shape[1])[None, :]
  inside = (
    (rows >= center[0] - pad)
    & (rows < center[0] + pad)
    & (cols >= center[1] - pad)
    & (cols < center[1] + pad)
  )
  return tf.where(inside[..., None], tf.constant(_FILL, tf.uint8), image)


OPS = (
  auto_contrast,
  equalize,
  invert,
  rotate,
  posterize,
  solarize,
  color,
  contrast,
  brightness,
  sharpness,
  shear_x,
  shear_y,
  translate_x,
  translate_y,
  cutout,
  solarize_add,
)


def randaugment(
  image: tf.Tensor, key: tf.Tensor, num_layers: int, magnitude: float
) -> tf.Tensor:
  """Applies `num_layers` random ops at `magnitude` to a uint8 RGB image.

  Args:
    image: uint8 (H, W, 3).
    key: int64 (2,) stateless random key.
    num_layers: number of ops applied one after the other.
    magnitude: strength of every op; 10 is the reference's maximum level.

  Returns:
    The augmented uint8 (H, W, 3) image.
  """
  level = tf.constant(magnitude / 10.0, tf.float32)
  for layer in range(num_layers):
    op_key, arg_key = _split(
      tf.random.experimental.stateless_fold_in(key, layer), 2
    )
    index = tf.random.stateless_uniform(
      [], op_key, minval=0, maxval=len(OPS), dtype=tf.int32
    )
    branches = [functools.partial(op, image, level, arg_key) for op in OPS]
    image = tf.ensure_shape(tf.switch_case(index, branches), image.shape)
  return image

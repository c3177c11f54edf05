"""RandAugment (Cubuk et al., 2020) on uint8 images, with stateless randomness.

The reference is big_vision's `randaug` (`autoaugment.
distort_image_with_randaugment`, the same as TF Model Garden's `augment.py`):
each of N layers picks one of 16 ops uniformly and always applies it at the
fixed magnitude M. Arguments grow linearly with M / 10 (10 is the reference's
maximum level; larger values extrapolate): rotations up to 30 degrees,
shears up to 0.3, translations up to 100 px and cutout squares of side 2 x 40
px, whatever the image size, with grey (128) filling what moves in. The ops
compute what the reference computes in TF, quirks included:

  Posterize  keeps int(4M/10) bits; the shift 8 - bits is cast to uint8 and
             TF clamps shifts to 7, so below 1 bit (M < 2.5) and above 8 bits
             (M >= 22.5) one bit is kept;
  Solarize   inverts the pixels >= int(256M/10), the threshold cast to uint8
             (it wraps): M = 0, 10 and 20 invert every pixel, M = 15 from 128;
  Contrast   blends towards a grey of (number of pixels) / 256, clipped to
             255, not towards the mean grey;
  blends     truncate towards zero instead of rounding.

Randomness (the op of each layer, signs, cutout centres) comes from a
stateless key, so an example's augmentation is a function of its key alone.
"""

import functools
import math

import tensorflow as tf

_MAX_LEVEL = 10.0
_FILL = 128
_TRANSLATE_CONST = 100
_CUTOUT_CONST = 40


def _split(key: tf.Tensor, num: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(key, num))


def _signed(value: float, key: tf.Tensor) -> tf.Tensor:
  """`value` or `-value` with equal probability."""
  coin = tf.random.stateless_uniform([], key)
  return tf.where(coin < 0.5, -value, value)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: float):
  """degenerate + factor * (image - degenerate), truncated to uint8."""
  if factor == 0.0:
    return tf.cast(degenerate, tf.uint8)
  if factor == 1.0:
    return image
  degenerate = tf.cast(degenerate, tf.float32)
  blended = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
  if not 0.0 < factor < 1.0:
    blended = tf.clip_by_value(blended, 0.0, 255.0)
  return tf.cast(blended, tf.uint8)


def _enhance_factor(magnitude: float) -> float:
  return magnitude / _MAX_LEVEL * 1.8 + 0.1


def _transform(image: tf.Tensor, transform) -> tf.Tensor:
  """Projective transform (output pixel -> input pixel), 128 outside.

  With nearest-neighbour sampling, filling with 128 is what the reference's
  wrap/unwrap (an extra channel marking the pixels from outside) gives.
  """
  images = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=tf.cast(tf.stack(transform)[None], tf.float32),
    output_shape=tf.shape(image)[:2],
    fill_value=float(_FILL),
    interpolation='NEAREST',
    fill_mode='CONSTANT',
  )
  return images[0]


def auto_contrast(image, magnitude, key):
  """Stretches each channel to the full 0..255 range."""
  del magnitude, key
  image_float = tf.cast(image, tf.float32)
  low = tf.reduce_min(image_float, axis=[0, 1])
  high = tf.reduce_max(image_float, axis=[0, 1])
  scale = 255.0 / (high - low)
  offset = -low * scale
  stretched = tf.clip_by_value(image_float * scale + offset, 0.0, 255.0)
  # Channels with a single value stay as they are.
  return tf.where(high > low, tf.cast(stretched, tf.uint8), image)


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


def equalize(image, magnitude, key):
  """Equalizes the histogram of each channel."""
  del magnitude, key
  channels = [_equalize_channel(image[..., c]) for c in range(3)]
  return tf.cast(tf.stack(channels, -1), tf.uint8)


def invert(image, magnitude, key):
  del magnitude, key
  return 255 - image


def rotate(image, magnitude, key):
  """Rotates by 30M/10 degrees, either way, about the centre."""
  angle = _signed(magnitude / _MAX_LEVEL * 30.0 * math.pi / 180.0, key)
  shape = tf.cast(tf.shape(image), tf.float32)
  h, w = shape[0] - 1, shape[1] - 1
  cos, sin = tf.cos(angle), tf.sin(angle)
  x_offset = (w - (cos * w - sin * h)) / 2.0
  y_offset = (h - (sin * w + cos * h)) / 2.0
  return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


def posterize(image, magnitude, key):
  """Keeps the int(4M/10) high bits of each value (see the module doc)."""
  del key
  bits = int(magnitude / _MAX_LEVEL * 4)
  shift = min((8 - bits) % 256, 7)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, magnitude, key):
  """Inverts the values >= int(256M/10) mod 256 (see the module doc)."""
  del key
  threshold = int(magnitude / _MAX_LEVEL * 256) % 256
  return tf.where(image < threshold, image, 255 - image)


def solarize_add(image, magnitude, key):
  """Adds int(110M/10) to the values below 128, clipped to 255."""
  del key
  addition = int(magnitude / _MAX_LEVEL * 110)
  added = tf.clip_by_value(tf.cast(image, tf.int64) + addition, 0, 255)
  return tf.where(image < 128, tf.cast(added, tf.uint8), image)


def color(image, magnitude, key):
  del key
  grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
  return _blend(grey, image, _enhance_factor(magnitude))


def contrast(image, magnitude, key):
  """Blends with a grey of (pixel count) / 256, as the reference does."""
  del key
  grey = tf.cast(tf.image.rgb_to_grayscale(image), tf.int32)
  histogram = tf.histogram_fixed_width(grey, [0, 255], nbins=256)
  mean = tf.reduce_sum(tf.cast(histogram, tf.float32)) / 256.0
  mean = tf.cast(tf.clip_by_value(mean, 0.0, 255.0), tf.uint8)
  return _blend(
    tf.fill(tf.shape(image), mean), image, _enhance_factor(magnitude)
  )


def brightness(image, magnitude, key):
  del key
  return _blend(tf.zeros_like(image), image, _enhance_factor(magnitude))


def sharpness(image, magnitude, key):
  """Blends with PIL's smoothing filter; border pixels stay unchanged."""
  del key
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(
    tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], 'VALID'
  )[0]
  smooth = tf.cast(tf.clip_by_value(smooth, 0.0, 255.0), tf.uint8)
  padding = [[1, 1], [1, 1], [0, 0]]
  inside = tf.pad(tf.ones_like(smooth, tf.bool), padding)
  degenerate = tf.where(inside, tf.pad(smooth, padding), image)
  return _blend(degenerate, image, _enhance_factor(magnitude))


def shear_x(image, magnitude, key):
  shear = _signed(magnitude / _MAX_LEVEL * 0.3, key)
  return _transform(image, [1.0, shear, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image, magnitude, key):
  shear = _signed(magnitude / _MAX_LEVEL * 0.3, key)
  return _transform(image, [1.0, 0.0, 0.0, shear, 1.0, 0.0, 0.0, 0.0])


def translate_x(image, magnitude, key):
  """Moves the content by 100M/10 px, either way."""
  pixels = _signed(magnitude / _MAX_LEVEL * _TRANSLATE_CONST, key)
  return _transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image, magnitude, key):
  pixels = _signed(magnitude / _MAX_LEVEL * _TRANSLATE_CONST, key)
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0])


def cutout(image, magnitude, key):
  """Greys a square of side 2 int(40M/10) px around a uniform random pixel."""
  pad = int(magnitude / _MAX_LEVEL * _CUTOUT_CONST)
  height, width = tf.unstack(tf.shape(image)[:2])
  row_key, col_key = _split(key, 2)
  row = tf.random.stateless_uniform(
    [], row_key, minval=0, maxval=height, dtype=tf.int32
  )
  col = tf.random.stateless_uniform(
    [], col_key, minval=0, maxval=width, dtype=tf.int32
  )
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = (
    (rows >= row - pad)
    & (rows < row + pad)
    & (cols >= col - pad)
    & (cols < col + pad)
  )
  return tf.where(inside[..., None], tf.constant(_FILL, tf.uint8), image)


# In the reference's order.
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


def layer_choice(key: tf.Tensor, layer: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(index into OPS drawn uniformly, key of the op's own randomness)."""
  op_key, arg_key = _split(
    tf.random.experimental.stateless_fold_in(key, layer), 2
  )
  index = tf.random.stateless_uniform(
    [], op_key, minval=0, maxval=len(OPS), dtype=tf.int32
  )
  return index, arg_key


def randaugment(
  image: tf.Tensor, key: tf.Tensor, num_layers: int, magnitude: float
) -> tf.Tensor:
  """Applies `num_layers` random ops at `magnitude` to a uint8 RGB image.

  Args:
    image: uint8 (H, W, 3).
    key: int64 (2,) stateless random key.
    num_layers: number of ops applied one after the other (N).
    magnitude: strength of every op (M); 10 is the reference's maximum level.

  Returns:
    The augmented uint8 (H, W, 3) image.
  """
  magnitude = float(magnitude)
  for layer in range(num_layers):
    index, arg_key = layer_choice(key, layer)
    branches = [functools.partial(op, image, magnitude, arg_key) for op in OPS]
    image = tf.ensure_shape(tf.switch_case(index, branches), image.shape)
  return image

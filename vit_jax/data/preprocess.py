"""Image and label preprocessing for tf.data pipelines.

Randomness is stateless: every random op takes a key (an int64 (2,) tensor)
derived from (seed, process, example position) or (seed, process, step), so
an example's augmentation depends neither on thread scheduling nor on where a
run was resumed.
"""

from collections.abc import Callable

import ml_collections
import tensorflow as tf

from vit_jax.data import randaugment as randaugment_lib

TRAIN_CROPS = ('inception', 'resize')
EVAL_CROPS = ('resize', 'central')
LOSSES = ('softmax_xent', 'sigmoid_xent')
# AugReg's augmentation settings (big_vision's configs/vit_i1k.py and
# vit_i21k.py): RandAugment (layers, magnitude) and mixup p.
AUGREG = {
  'none': (0, 0, 0.0),
  'light1': (2, 0, 0.0),
  'light2': (2, 10, 0.2),
  'medium1': (2, 15, 0.2),
  'medium2': (2, 15, 0.5),
  'strong1': (2, 20, 0.5),
  'strong2': (2, 20, 0.8),
}
Record = dict[str, tf.Tensor]


def key_for(seed: int, *data) -> tf.Tensor:
  """A stateless key folding `data` (ints or int tensors) into `seed`."""
  key = tf.constant([seed, 0], tf.int64)
  for d in data:
    key = tf.random.experimental.stateless_fold_in(key, d)
  return key


def _decode_other(data: tf.Tensor) -> tf.Tensor:
  return tf.io.decode_image(data, channels=3, expand_animations=False)


def decode(image: tf.Tensor) -> tf.Tensor:
  """uint8 RGB (H, W, 3) from encoded bytes; decoded images pass through.

  Truncated JPEGs decode with their missing rows grey instead of stopping a
  run.
  """
  if image.dtype != tf.string:
    return image
  return tf.cond(
    tf.io.is_jpeg(image),
    lambda: tf.io.decode_jpeg(
      image, channels=3, try_recover_truncated=True, acceptable_fraction=0.0
    ),
    lambda: _decode_other(image),
  )


def _crop_window(shape: tf.Tensor, key: tf.Tensor, min_area: float):
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
    seed=key,
    min_object_covered=0.0,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(min_area, 1.0),
    use_image_if_no_bounding_boxes=True,
  )
  return begin, size


def inception_crop(
  image: tf.Tensor, key: tf.Tensor, min_area: float = 0.05
) -> tf.Tensor:
  """A random crop of min_area..100% of the area, aspect ratio 3/4..4/3.

  Encoded JPEGs are decoded inside the crop window only, which is faster.

  Args:
    image: encoded bytes or uint8 (H, W, 3).
    key: stateless random key.
    min_area: smallest fraction of the image area kept.

  Returns:
    The uint8 (h, w, 3) crop.
  """

  def crop_decoded(decoded):
    begin, size = _crop_window(tf.shape(decoded), key, min_area)
    return tf.slice(decoded, begin, size)

  if image.dtype != tf.string:
    return crop_decoded(image)

  def crop_jpeg():
    begin, size = _crop_window(
      tf.image.extract_jpeg_shape(image), key, min_area
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(
      image,
      window,
      channels=3,
      try_recover_truncated=True,
      acceptable_fraction=0.0,
    )

  return tf.cond(
    tf.io.is_jpeg(image), crop_jpeg, lambda: crop_decoded(_decode_other(image))
  )


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear resize to (size, size), float32 values in 0..255."""
  return tf.image.resize(image, [size, size], method='bilinear')


def central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resizes the short side to size * 256/224, then crops the centre."""
  short = round(size * 256 / 224)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = short / tf.reduce_min(shape)
  new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  image = tf.image.resize(image, new_shape, method='bilinear')
  top, left = (new_shape[0] - size) // 2, (new_shape[1] - size) // 2
  return tf.ensure_shape(
    image[top : top + size, left : left + size], [size, size, 3]
  )


def normalize(image: tf.Tensor) -> tf.Tensor:
  """Pixel values 0..255 to [-1, 1]."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def labels(label: tf.Tensor, num_classes: int, loss: str) -> tf.Tensor:
  """float32 (num_classes,) targets of a class id or a set of class ids.

  sigmoid_xent gives multi-hot targets; softmax_xent spreads the probability
  evenly over the set (one-hot for a single class). An empty set gives zeros.
  """
  if label.shape.rank == 0:
    targets = tf.one_hot(label, num_classes)
  else:
    counts = tf.reduce_sum(tf.one_hot(label, num_classes), axis=0)
    targets = tf.minimum(counts, 1.0)
  if loss == 'softmax_xent':
    targets /= tf.maximum(tf.reduce_sum(targets), 1.0)
  return targets


def resolve_augreg(pp: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `pp` config with an AugReg setting spelled out.

  `pp.augreg` names one of AUGREG; it sets randaugment_layers,
  randaugment_magnitude and mixup_alpha, which must then be left unset.

  Args:
    pp: the `pp` config.

  Returns:
    `pp` itself without an AugReg setting, else a copy with its values.
  """
  name = pp.get('augreg')
  if not name:
    return pp
  if name not in AUGREG:
    raise ValueError(
      f'config.pp.augreg={name!r}; use one of {list(AUGREG)} or None.'
    )
  if pp.randaugment_layers or pp.mixup_alpha:
    raise ValueError(
      f'config.pp.augreg={name!r} sets RandAugment and mixup; leave '
      'config.pp.randaugment_layers and config.pp.mixup_alpha at 0, or unset '
      'config.pp.augreg.'
    )
  layers, magnitude, mixup_p = AUGREG[name]
  resolved = pp.copy_and_resolve_references()
  resolved.update(
    randaugment_layers=layers,
    randaugment_magnitude=magnitude,
    mixup_alpha=mixup_p,
  )
  return resolved


def mixup(batch: Record, key: tf.Tensor, alpha: float) -> Record:
  """Mixes a batch with itself rolled by one, as big_vision does.

  The ratio a is drawn from Beta(alpha, alpha) and made at least 1/2, so
  each example keeps the larger share: x' = a x + (1 - a) roll(x, 1).
  """
  key_a, key_b = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  gamma_a = tf.random.stateless_gamma([], key_a, alpha=alpha)
  gamma_b = tf.random.stateless_gamma([], key_b, alpha=alpha)
  ratio = tf.math.divide_no_nan(gamma_a, gamma_a + gamma_b)
  ratio = tf.maximum(ratio, 1.0 - ratio)

  def mix(x):
    return ratio * x + (1.0 - ratio) * tf.roll(x, shift=1, axis=0)

  return {
    **batch,
    'images': mix(batch['images']),
    'labels': mix(batch['labels']),
  }


def train_fn(
  pp,
  *,
  image_size: int,
  num_classes: int,
  loss: str,
  seed: int,
  process_index: int,
  image_fn: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> Callable[[Record], Record]:
  """Record {'image', 'label', 'index'} -> {'images', 'labels'} for training.

  Args:
    pp: the `pp` config (train_crop, min_area, flip, randaugment_layers,
      randaugment_magnitude), AugReg settings resolved (`resolve_augreg`).
    image_size: output resolution.
    num_classes: number of classes.
    loss: 'softmax_xent' or 'sigmoid_xent' (see `labels`).
    seed: the run's seed.
    process_index: this process, so that processes augment differently.
    image_fn: applied to the decoded uint8 image, or None.

  Returns:
    The function, for `tf.data.Dataset.map`.
  """

  def fn(record: Record) -> Record:
    # Stream 0 holds the per-example keys, stream 1 the per-batch ones.
    key = key_for(seed, 0, process_index, record['index'])
    crop_key, flip_key, augment_key = tf.unstack(
      tf.random.experimental.stateless_split(key, 3)
    )
    if pp.train_crop == 'inception':
      image = inception_crop(record['image'], crop_key, pp.min_area)
    else:
      image = decode(record['image'])
    if image_fn is not None:
      image = image_fn(image)
    image = resize(image, image_size)
    if pp.flip:
      image = tf.image.stateless_random_flip_left_right(image, flip_key)
    if pp.randaugment_layers:
      image = randaugment_lib.randaugment(
        tf.cast(tf.round(image), tf.uint8),
        augment_key,
        pp.randaugment_layers,
        pp.randaugment_magnitude,
      )
    return {
      'images': normalize(image),
      'labels': labels(record['label'], num_classes, loss),
    }

  return fn


def eval_fn(
  pp,
  *,
  image_size: int,
  num_classes: int,
  loss: str,
  image_fn: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> Callable[[Record], Record]:
  """Record {'image', 'label'} -> {'images', 'labels', 'mask'} for eval."""

  def fn(record: Record) -> Record:
    image = decode(record['image'])
    if image_fn is not None:
      image = image_fn(image)
    if pp.eval_crop == 'central':
      image = central_crop(image, image_size)
    else:
      image = resize(image, image_size)
    return {
      'images': normalize(image),
      'labels': labels(record['label'], num_classes, loss),
      'mask': tf.constant(1.0),
    }

  return fn

"""Dataset presets: the tfds data, splits and labels of the paper's datasets.

A preset names a tfds builder, the tfds split behind each of the four splits
the training jobs use, and how a class id is read from an example:

  train       training data while hyperparameters are chosen;
  val         held-out data the hyperparameters are chosen on;
  test        the data results are reported on;
  train_full  all training data, for the final run after the sweep.

The splits follow the paper's code (`vit_jax/input_pipeline.py`) and, for the
19 VTAB-1k tasks, `google-research/task_adaptation`: sweeps train on the first
800 examples of the task's train split (`train800`) and validate on the first
200 of its val split (`val200`); the final run trains on both (`train_full`)
and is scored on the task's test split.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Head:
  """The first `n` examples of a tfds split, e.g. VTAB-1k's train800."""

  split: str
  n: int


# A tfds split string ('train[:90%]'), a Head, or a union of those.
SplitSpec = str | Head | tuple[str | Head, ...]
Features = Mapping[str, Any]


def _label(features: Features) -> tf.Tensor:
  return features['label']


def _label_set(features: Features) -> tf.Tensor:
  # ImageNet-21k releases store one class ('label') or a set ('labels').
  return features['labels'] if 'labels' in features else features['label']


def _real_label(features: Features) -> tf.Tensor:
  # The ReaL builder only serves the test split; the others are ImageNet's.
  if 'real_label' in features:
    return features['real_label']
  return features['label']


def _bucketize(values: tf.Tensor, boundaries: list[float]) -> tf.Tensor:
  """Index of the bin (boundaries[i-1], boundaries[i]] holding each value."""
  above = tf.cast(values[..., None] > tf.constant(boundaries), tf.int64)
  return tf.reduce_sum(above, axis=-1)


def _clevr_count(features: Features) -> tf.Tensor:
  # Scenes hold 3 to 10 objects.
  return tf.size(features['objects']['size'], out_type=tf.int64) - 3


def _clevr_distance(features: Features) -> tf.Tensor:
  depth = tf.reduce_min(features['objects']['pixel_coords'][:, 2])
  return _bucketize(depth, [8.0, 8.5, 9.0, 9.5, 10.0])


def _kitti_vehicle_distance(features: Features) -> tf.Tensor:
  objects = features['objects']
  # Types 0, 1, 2 are Car, Van and Truck. Without a vehicle the distance is
  # 1000 m, which lands in the last class ("no vehicle").
  depth = tf.boolean_mask(objects['location'][:, 2], objects['type'] < 3)
  nearest = tf.reduce_min(tf.concat([depth, [1000.0]], axis=0))
  return _bucketize(nearest, [8.0, 20.0, 999.0])


def _coarse(key: str, factor: float) -> Callable[[Features], tf.Tensor]:
  """Merges neighbouring values of an attribute: floor(value / factor)."""

  def label(features: Features) -> tf.Tensor:
    value = tf.cast(features[key], tf.float32)
    return tf.cast(tf.math.floordiv(value, factor), tf.int64)

  return label


def _attribute(key: str) -> Callable[[Features], tf.Tensor]:
  return lambda features: features[key]


def _binary_mask_to_uint8(image: tf.Tensor) -> tf.Tensor:
  # dSprites stores 0/1 masks.
  return image * 255


@dataclasses.dataclass(frozen=True)
class Preset:
  """How one dataset is read.

  Attributes:
    tfds_name: the tfds builder ('name' or 'name/config').
    splits: the tfds split behind each of `config.SPLITS`.
    num_classes: number of classes; None reads it from the 'label' feature.
    label: decoded features -> int64 class id, or a vector of ids for an
      example with a set of labels.
    image: the decoded uint8 RGB image -> uint8 RGB image, or None.
    split_tfds_names: splits read from another builder than `tfds_name`.
    class_names: names of derived classes (None: the label feature's names).
  """

  tfds_name: str
  splits: Mapping[str, SplitSpec]
  num_classes: int | None = None
  label: Callable[[Features], tf.Tensor] = _label
  image: Callable[[tf.Tensor], tf.Tensor] | None = None
  split_tfds_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
  class_names: tuple[str, ...] | None = None


def _holdout(train_fraction: int) -> dict[str, str]:
  return {
    'train': f'train[:{train_fraction}%]',
    'val': f'train[{train_fraction}%:]',
    'test': 'test',
    'train_full': 'train',
  }


_IMAGENET_SPLITS = {
  'train': 'train[:99%]',
  'val': 'train[99%:]',
  'test': 'validation',
  'train_full': 'train',
}

# big_vision's ImageNet-21k split: the first 51,200 images are held out.
_IMAGENET21K_SPLITS = {
  'train': 'full[51200:]',
  'val': 'full[25600:51200]',
  'test': 'full[:25600]',
  'train_full': 'full[51200:]',
}

PRESETS: dict[str, Preset] = {
  'imagenet2012': Preset('imagenet2012', _IMAGENET_SPLITS),
  'imagenet2012_real': Preset(
    'imagenet2012',
    _IMAGENET_SPLITS,
    label=_real_label,
    split_tfds_names={'test': 'imagenet2012_real'},
  ),
  'imagenet21k': Preset('imagenet21k', _IMAGENET21K_SPLITS, label=_label_set),
  'cifar10': Preset('cifar10', _holdout(98)),
  'cifar100': Preset('cifar100', _holdout(98)),
  'oxford_iiit_pet': Preset('oxford_iiit_pet', _holdout(90)),
  'oxford_flowers102': Preset('oxford_flowers102', _holdout(90)),
}


def _vtab(tfds_name: str, train: str, val: str, test: str, **kw) -> Preset:
  train800, val200 = Head(train, 800), Head(val, 200)
  splits = {
    'train': train800,
    'val': val200,
    'test': test,
    'train_full': (train800, val200),
  }
  return Preset(tfds_name, splits, **kw)


_DSPRITES = ('dsprites', 'train[:80%]', 'train[80%:90%]', 'train[90%:]')
_SMALLNORB = ('smallnorb', 'train', 'test[:50%]', 'test[50%:]')
_CLEVR = ('clevr', 'train[:90%]', 'train[90%:]', 'validation')

VTAB_TASKS: dict[str, Preset] = {
  # Natural.
  'caltech101': _vtab('caltech101', 'train[:90%]', 'train[90%:]', 'test'),
  'cifar100': _vtab('cifar100', 'train[:90%]', 'train[90%:]', 'test'),
  'dtd': _vtab('dtd', 'train', 'validation', 'test'),
  'oxford_flowers102': _vtab(
    'oxford_flowers102', 'train', 'validation', 'test'
  ),
  'oxford_iiit_pet': _vtab(
    'oxford_iiit_pet', 'train[:80%]', 'train[80%:]', 'test'
  ),
  'sun397': _vtab('sun397/tfds', 'train', 'validation', 'test'),
  'svhn': _vtab('svhn_cropped', 'train[:90%]', 'train[90%:]', 'test'),
  # Specialized.
  'patch_camelyon': _vtab('patch_camelyon', 'train', 'validation', 'test'),
  'eurosat': _vtab(
    'eurosat/rgb', 'train[:60%]', 'train[60%:80%]', 'train[80%:]'
  ),
  'resisc45': _vtab('resisc45', 'train[:60%]', 'train[60%:80%]', 'train[80%:]'),
  'diabetic_retinopathy': _vtab(
    'diabetic_retinopathy_detection/btgraham-300',
    'train',
    'validation',
    'test',
  ),
  # Structured.
  'clevr_count_all': _vtab(
    *_CLEVR,
    num_classes=8,
    label=_clevr_count,
    class_names=tuple(str(n) for n in range(3, 11)),
  ),
  'clevr_closest_object_distance': _vtab(
    *_CLEVR, num_classes=6, label=_clevr_distance
  ),
  'dmlab': _vtab('dmlab', 'train', 'validation', 'test'),
  'kitti_closest_vehicle_distance': _vtab(
    'kitti',
    'train',
    'validation',
    'test',
    num_classes=4,
    label=_kitti_vehicle_distance,
    class_names=('<8m', '8-20m', '20-999m', 'none'),
  ),
  'dsprites_location': _vtab(
    *_DSPRITES,
    num_classes=16,
    label=_coarse('label_x_position', 2.0),
    image=_binary_mask_to_uint8,
  ),
  'dsprites_orientation': _vtab(
    *_DSPRITES,
    num_classes=16,
    label=_coarse('label_orientation', 2.5),
    image=_binary_mask_to_uint8,
  ),
  'smallnorb_azimuth': _vtab(
    *_SMALLNORB, num_classes=18, label=_attribute('label_azimuth')
  ),
  'smallnorb_elevation': _vtab(
    *_SMALLNORB, num_classes=9, label=_attribute('label_elevation')
  ),
}

VTAB_GROUPS: dict[str, tuple[str, ...]] = {
  'natural': (
    'caltech101',
    'cifar100',
    'dtd',
    'oxford_flowers102',
    'oxford_iiit_pet',
    'sun397',
    'svhn',
  ),
  'specialized': (
    'patch_camelyon',
    'eurosat',
    'resisc45',
    'diabetic_retinopathy',
  ),
  'structured': (
    'clevr_count_all',
    'clevr_closest_object_distance',
    'dmlab',
    'kitti_closest_vehicle_distance',
    'dsprites_location',
    'dsprites_orientation',
    'smallnorb_azimuth',
    'smallnorb_elevation',
  ),
}

PRESETS.update({f'vtab/{task}': preset for task, preset in VTAB_TASKS.items()})

DIGITS = 'digits'


def list_presets() -> list[str]:
  """Every dataset name with a preset, the offline 'digits' first."""
  return [DIGITS, *PRESETS]

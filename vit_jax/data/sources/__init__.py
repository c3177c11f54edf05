"""Where examples come from: tfds builders, image folders and digits scans.

A source serves the four splits of one dataset (`config.SPLITS`); see
`base.Source`. One module per kind of source:

  arrays       examples addressable by index (`digits`, and image folders);
  folder       image folders: scanning, checking and splitting the files;
  tfds_source  prepared tfds datasets.

`open_source` picks the kind a dataset name means.
"""

import dataclasses
import difflib
import os
from collections.abc import Mapping

import tensorflow_datasets as tfds

from vit_jax.data import presets
from vit_jax.data.presets import SplitSpec
from vit_jax.data.sources.arrays import ArraySource, digits
from vit_jax.data.sources.base import Source, resolve_split
from vit_jax.data.sources.folder import image_folder
from vit_jax.data.sources.tfds_source import (
  DatasetNotPreparedError,
  TfdsSource,
  generic_preset,
  load_builder,
)

__all__ = [
  'ArraySource',
  'DatasetNotPreparedError',
  'Source',
  'TfdsSource',
  'digits',
  'image_folder',
  'load_builder',
  'open_source',
  'resolve_split',
]


def _unknown(name: str) -> ValueError:
  close = difflib.get_close_matches(name, presets.list_presets(), n=5)
  hint = f' Close preset names: {close}.' if close else ''
  return ValueError(
    f'Unknown dataset {name!r}.{hint} Use a preset (see '
    'vit_jax.data.list_presets()), "tfds:NAME" for any tfds dataset, or a '
    'folder of images, root/<class>/* or root/train/<class>/*.'
  )


def open_source(
  name: str,
  *,
  splits: Mapping[str, SplitSpec] | None = None,
  data_dir: str | None = None,
  download: bool = False,
  imagenet21k_name: str = 'imagenet21k',
) -> Source:
  """The source of a dataset name.

  Args:
    name: 'digits'; a preset name (`presets.list_presets()`); 'tfds:NAME' or
      a registered tfds name; or a directory of images (see `image_folder`).
    splits: split specs overriding the defaults, by split name.
    data_dir: where tfds looks for prepared data.
    download: whether tfds may download and prepare missing data.
    imagenet21k_name: tfds name or directory of the ImageNet-21k data.

  Returns:
    The source.
  """
  splits = {k: v for k, v in (splits or {}).items() if v}
  if name == presets.DIGITS:
    return digits(splits)
  if name in presets.PRESETS:
    preset = presets.PRESETS[name]
    if name == 'imagenet21k':
      preset = dataclasses.replace(preset, tfds_name=imagenet21k_name)
    tfds_names = {preset.tfds_name, *preset.split_tfds_names.values()}
    builders = {n: load_builder(n, data_dir, download) for n in tfds_names}
    return TfdsSource(name, preset, builders, splits)
  path = os.path.expanduser(name)
  if os.path.isdir(path) and not os.path.exists(
    os.path.join(path, 'dataset_info.json')
  ):
    return image_folder(path, splits)
  if name.startswith(('/', '.', '~')) and not os.path.exists(path):
    raise FileNotFoundError(f'Dataset directory {name!r} does not exist.')
  if name.startswith('vtab/'):
    raise _unknown(name)
  tfds_name = name.removeprefix('tfds:')
  try:
    builder = load_builder(tfds_name, data_dir, download)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise _unknown(name) from e
  preset = generic_preset(tfds_name, builder)
  return TfdsSource(name, preset, {tfds_name: builder}, splits)

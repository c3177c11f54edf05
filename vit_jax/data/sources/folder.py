"""Image folders: one sub-folder of images per class."""

import concurrent.futures
import os
from collections.abc import Mapping

import numpy as np
from absl import logging
from PIL import Image

from vit_jax.data.presets import SplitSpec
from vit_jax.data.sources.arrays import ArraySource

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
# Formats tf.io.decode_image reads, as PIL names them.
_DECODABLE = ('JPEG', 'MPO', 'PNG', 'GIF', 'BMP')


def _image_problem(path: str) -> str | None:
  """Why a file is not a readable image tf can decode, or None."""
  try:
    with Image.open(path) as image:
      if image.format not in _DECODABLE:
        return f'format {image.format} is not one of {_DECODABLE}'
      # Checks the whole PNG stream (CRCs, truncation) without decoding.
      image.verify()
  except Exception as e:  # Any failure means the file is unreadable.
    return f'{type(e).__name__}: {e}'
  return None


def _list_images(directory: str) -> list[str]:
  found = []
  for parent, dirs, files in os.walk(directory):
    dirs.sort()
    found += [
      os.path.join(parent, f)
      for f in sorted(files)
      if f.lower().endswith(IMAGE_EXTENSIONS)
    ]
  return found


def _readable(paths: list[str], root: str) -> list[bool]:
  """Checks every file once; reports and counts the unreadable ones."""
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    problems = list(pool.map(_image_problem, paths))
  for path, problem in zip(paths, problems, strict=True):
    if problem:
      logging.warning('Skipping unreadable image %s (%s).', path, problem)
  skipped = sum(p is not None for p in problems)
  if skipped:
    logging.warning(
      'Skipped %d of %d files under %s that are not readable images.',
      skipped,
      len(paths),
      root,
    )
  return [p is None for p in problems]


def image_folder(
  root: str, splits: Mapping[str, SplitSpec] | None = None
) -> ArraySource:
  """Images in `root/{train,test}/<class>/*` (and optionally `root/val`).

  Class names are the sorted sub-directory names of `train`; every split must
  have the same classes. Files that are not readable images are reported with
  their path, counted and skipped. Each split's files are put in a fixed
  pseudo-random order, so that a slice such as 'train[90%:]' or a process's
  shard samples every class.

  Args:
    root: the folder.
    splits: split specs overriding the defaults (train: 'train', val: 'val'
      or 'validation' where present, else 'test', test: 'test', train_full:
      'train').

  Returns:
    The source.
  """
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Image folder {root!r} does not exist.')
  present = [
    d
    for d in ('train', 'val', 'validation', 'test')
    if os.path.isdir(os.path.join(root, d))
  ]
  if 'train' not in present or 'test' not in present:
    raise ValueError(
      f'Image folder {root!r} needs train/<class>/ and test/<class>/ '
      f'sub-directories of images; it has {sorted(os.listdir(root))}.'
    )
  classes = {
    split: sorted(
      e.name for e in os.scandir(os.path.join(root, split)) if e.is_dir()
    )
    for split in present
  }
  for split in present:
    if classes[split] != classes['train']:
      only_train = sorted(set(classes['train']) - set(classes[split]))
      only_split = sorted(set(classes[split]) - set(classes['train']))
      raise ValueError(
        f'Image folder {root!r}: the classes of {split}/ differ from those of '
        f'train/ (only in train/: {only_train}; only in {split}/: '
        f'{only_split}).'
      )
  paths, labels, sizes = [], [], {}
  for split in present:
    files = [
      (path, label)
      for label, name in enumerate(classes['train'])
      for path in _list_images(os.path.join(root, split, name))
    ]
    ok = _readable([path for path, _ in files], os.path.join(root, split))
    files = [f for f, good in zip(files, ok, strict=True) if good]
    if not files:
      raise ValueError(
        f'Image folder {root!r}: no readable images '
        f'({", ".join(IMAGE_EXTENSIONS)}) under {split}/<class>/.'
      )
    order = np.random.default_rng(0).permutation(len(files))
    paths += [files[i][0] for i in order]
    labels += [files[i][1] for i in order]
    sizes[split] = len(files)
  val = next((d for d in ('val', 'validation') if d in present), 'test')
  defaults = {
    'train': 'train',
    'val': val,
    'test': 'test',
    'train_full': 'train',
  }
  return ArraySource(
    root,
    np.array(paths, dtype=object),
    np.array(labels),
    sizes,
    {**defaults, **(splits or {})},
    classes['train'],
  )

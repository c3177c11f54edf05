"""Image folders: one sub-folder of images per class, split or not.

Two layouts:

  root/<class>/*                    every image; val and test are cut from it;
  root/train/<class>/*              train, with optional held-out folders
  [root/val/<class>/* or            root/val (or root/validation) and
   root/validation/<class>/*]       root/test; a missing one is cut from train.
  [root/test/<class>/*]

Class names are the sorted class folder names (hidden folders are ignored);
every split folder must have the same classes. A cut takes, in each class
separately, 10% of its images for each missing held-out split (at least one
where the class keeps a training image), in a pseudo-random order that
depends only on the class's name and files, so the same files always give
the same splits. `Source.split_files()` lists the files of each split.

Every file with an image extension is checked once. PNGs and RGB or grey
JPEGs are decoded by TF; any other image PIL reads (palette or 1-bit BMPs,
CMYK JPEGs, GIFs, WebP, TIFF) is decoded by PIL as PIL shows it in RGB.
Files PIL cannot read completely (broken or truncated) are skipped, named
and counted in one warning. A class folder without a readable image is an
error: skipping it would silently change the classes, and keeping it would
make a class that cannot be learnt.
"""

import concurrent.futures
import math
import os
from collections.abc import Mapping

import numpy as np
from absl import logging
from PIL import Image

from vit_jax.data.presets import SplitSpec
from vit_jax.data.sources.arrays import ArraySource, ImageFiles

IMAGE_EXTENSIONS = (
  '.jpg',
  '.jpeg',
  '.png',
  '.gif',
  '.bmp',
  '.webp',
  '.tif',
  '.tiff',
)
_VAL_DIRS = ('val', 'validation')
_SPLIT_DIRS = ('train', *_VAL_DIRS, 'test')
# The share of each class cut for each missing held-out split.
_HELD_OUT_FRACTION = 0.1
_CUT_SEED = 0


def _check(path: str) -> tuple[bool, str | None]:
  """(whether PIL must decode the file, why it is unreadable or None)."""
  try:
    with Image.open(path) as image:
      tf_decodes = image.format == 'PNG' or (
        image.format in ('JPEG', 'MPO') and image.mode in ('RGB', 'L')
      )
      if image.format == 'PNG':
        image.verify()  # Checks CRCs and truncation without decoding.
      else:
        if image.format in ('JPEG', 'MPO'):
          # Decoding at 1/8 scale is fast and still reaches the end.
          image.draft(None, (1, 1))
        image.load()
  except Exception as e:  # Any failure means the file is unreadable.
    return False, f'{type(e).__name__}: {e}'
  return not tf_decodes, None


def _sub_dirs(directory: str) -> list[str]:
  return sorted(
    e.name
    for e in os.scandir(directory)
    if e.is_dir() and not e.name.startswith('.')
  )


def _list_images(root: str, directory: str) -> list[str]:
  """Image files under root/directory, relative to root, sorted."""
  found = []
  for parent, dirs, files in os.walk(os.path.join(root, directory)):
    dirs.sort()
    found += [
      os.path.relpath(os.path.join(parent, f), root)
      for f in sorted(files)
      if f.lower().endswith(IMAGE_EXTENSIONS)
    ]
  return found


def _split_dirs(root: str) -> tuple[list[str], list[str]]:
  """(split folders, class names) of a folder, checked."""
  entries = _sub_dirs(root)
  split_dirs = [d for d in _SPLIT_DIRS if d in entries]
  if not split_dirs:
    if not entries:
      raise ValueError(
        f'Image folder {root!r} has no class folders; put the images of '
        'each class in a folder of its own, root/<class>/*.'
      )
    return [''], entries
  others = sorted(set(entries) - set(split_dirs))
  problem = None
  if others:
    problem = f'it mixes split folders {split_dirs} with others {others}'
  elif 'train' not in split_dirs:
    problem = f'it has {split_dirs} but no train/'
  elif all(d in split_dirs for d in _VAL_DIRS):
    problem = 'it has both val/ and validation/'
  if problem:
    raise ValueError(
      f'Image folder {root!r}: {problem}. Use root/<class>/* or '
      'root/train/<class>/* with optional root/val/<class>/* and '
      'root/test/<class>/*.'
    )
  classes = {d: _sub_dirs(os.path.join(root, d)) for d in split_dirs}
  for d in split_dirs:
    if classes[d] != classes['train']:
      only_train = sorted(set(classes['train']) - set(classes[d]))
      only_split = sorted(set(classes[d]) - set(classes['train']))
      raise ValueError(
        f'Image folder {root!r}: the classes of {d}/ differ from those of '
        f'train/ (only in train/: {only_train}; only in {d}/: {only_split}).'
      )
  return split_dirs, classes['train']


def _scan(root: str, files: list[str]) -> tuple[list[bool], dict[str, str]]:
  """(PIL decodes, for each file; problem of each unreadable file)."""
  paths = [os.path.join(root, f) for f in files]
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    checks = list(pool.map(_check, paths))
  skipped = {f: p for f, (_, p) in zip(files, checks, strict=True) if p}
  if skipped:
    listing = ''.join(f'\n  {f} ({p})' for f, p in skipped.items())
    logging.warning(
      'Skipped %d of %d image files under %s that PIL cannot read:%s',
      len(skipped),
      len(files),
      root,
      listing,
    )
  via_pil = sum(pil for pil, problem in checks if not problem)
  if via_pil:
    logging.info('%d images under %s are decoded by PIL.', via_pil, root)
  return [pil for pil, _ in checks], skipped


def _cut(
  paths: list[str], labels: np.ndarray, classes: list[str], held_out: list
) -> np.ndarray:
  """The split of each training file: 'train' or one of `held_out`.

  Each class is cut on its own, in an order seeded by its name, so adding
  files to one class leaves the others' splits as they were.
  """
  assignment = np.full(len(paths), 'train', dtype=object)
  for label, name in enumerate(classes):
    members = np.flatnonzero(labels == label)
    members = members[np.argsort([paths[i] for i in members])]
    rng = np.random.default_rng([_CUT_SEED, *name.encode()])
    members = rng.permutation(members)
    start = 0
    for split in held_out:
      wanted = max(1, math.floor(_HELD_OUT_FRACTION * len(members) + 0.5))
      # At least one image of the class stays in train.
      take = max(0, min(wanted, len(members) - start - 1))
      assignment[members[start : start + take]] = split
      start += take
  return assignment


def _files(root: str, split_dirs: list[str], classes: list[str]):
  """(paths relative to root, labels, split folders) of every image file."""
  files, labels, dirs = [], [], []
  for d in split_dirs:
    for label, name in enumerate(classes):
      found = _list_images(root, os.path.join(d, name))
      files += found
      labels += [label] * len(found)
      dirs += [d] * len(found)
  return files, np.array(labels, int), np.array(dirs, dtype=object)


def _check_no_empty_class(root, split_dirs, classes, labels, dirs):
  present = set(zip(dirs.tolist(), labels.tolist(), strict=True))
  for d in split_dirs:
    for label, name in enumerate(classes):
      if (d, label) not in present:
        folder = os.path.join(root, d, name)
        raise ValueError(
          f'Image folder {root!r}: class folder {folder!r} has no readable '
          f'images ({", ".join(IMAGE_EXTENSIONS)}); add images or remove it.'
        )


def _cut_held_out(root, split_dirs, val, files, labels, bases, classes):
  """Cuts the missing test and val splits from train (`bases` in place).

  Returns:
    The names of the splits cut.
  """
  held_out = [
    s for s, d in (('test', 'test'), ('val', val)) if d not in split_dirs
  ]
  if held_out:
    train = np.flatnonzero(bases == 'train')
    bases[train] = _cut(
      [files[i] for i in train], labels[train], classes, held_out
    )
    logging.info(
      'Image folder %s: %s cut from its training images, by class.',
      root,
      ' and '.join(held_out),
    )
  return held_out


def image_folder(
  root: str, splits: Mapping[str, SplitSpec] | None = None
) -> ArraySource:
  """The images of a folder, in either layout of the module doc.

  Args:
    root: the folder.
    splits: split specs overriding the defaults (train: 'train', val: 'val'
      or 'validation', test: 'test', train_full: 'train', or 'train+val'
      where val is cut from train). The base splits they slice are the split
      folders' names, and 'val' and 'test' where those are cut.

  Returns:
    The source.
  """
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Image folder {root!r} does not exist.')
  split_dirs, classes = _split_dirs(root)
  files, labels, dirs = _files(root, split_dirs, classes)
  via_pil, skipped = _scan(root, files)
  keep = np.array([f not in skipped for f in files], bool)
  _check_no_empty_class(root, split_dirs, classes, labels[keep], dirs[keep])
  files = [f for f, k in zip(files, keep, strict=True) if k]
  via_pil = np.array(via_pil, bool)[keep]
  labels, bases = labels[keep], dirs[keep]
  bases[bases == ''] = 'train'  # A folder of classes is all training data.
  val = next((d for d in _VAL_DIRS if d in split_dirs), None)
  held_out = _cut_held_out(root, split_dirs, val, files, labels, bases, classes)
  # Each base split in a fixed pseudo-random order, so that a slice such as
  # 'train[90%:]' or a process's shard samples every class.
  names = [n for n in ('train', 'val', 'validation', 'test') if n in bases]
  rows = [
    np.random.default_rng(0).permutation(np.flatnonzero(bases == n))
    for n in names
  ]
  order = np.concatenate(rows)
  defaults = {
    'train': 'train',
    'val': val or 'val',
    'test': 'test',
    'train_full': 'train+val' if 'val' in held_out else 'train',
  }
  return ArraySource(
    root,
    ImageFiles(root, [files[i] for i in order], via_pil[order].tolist()),
    labels[order],
    {n: len(r) for n, r in zip(names, rows, strict=True)},
    {**defaults, **(splits or {})},
    classes,
  )

"""Image folders: layouts, held-out splits cut by class, unreadable files."""

import logging
import math
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn import datasets as sk_datasets

from helpers import small_data_config, write_png
from vit_jax import data, sharding


@pytest.fixture(scope='module')
def mesh():
  return sharding.create_mesh(data=8, model=1)


def _config(dataset, **overrides):
  return small_data_config(dataset=str(dataset), **overrides)


def _pixels(ds, split):
  """The uint8 images of a split (8x8: the resize is the identity)."""
  images = [
    batch['images'][batch['mask'] > 0] for batch in ds.local_eval_iter(split)
  ]
  return np.round((np.concatenate(images) + 1) * 127.5).astype(np.uint8)


def _labels(ds, split):
  labels = [b['labels'][b['mask'] > 0] for b in ds.local_eval_iter(split)]
  return np.concatenate(labels).argmax(1)


def _sizes(n):
  """{split: images} of a class of n after the cut: 10% for each of test
  and val, at least one while a training image is left."""
  tenth = max(1, math.floor(0.1 * n + 0.5))
  test = max(0, min(tenth, n - 1))
  val = max(0, min(tenth, n - test - 1))
  return {'train': n - test - val, 'test': test, 'val': val}


@pytest.fixture(scope='module')
def digits_folder(tmp_path_factory):
  """600 of scikit-learn's digits as PNGs in root/<digit>/, no splits."""
  root = tmp_path_factory.mktemp('digits')
  scans = sk_datasets.load_digits()
  for i in range(600):
    grey = np.round(scans.images[i] * 255 / 16).astype(np.uint8)
    path = root / str(scans.target[i]) / f'{i:04d}.png'
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(grey).save(path)
  return root, scans.target[:600]


def test_a_folder_of_classes_gets_stratified_held_out_splits(
  digits_folder, mesh
):
  root, targets = digits_folder
  ds = data.get_dataset(_config(root), mesh)
  assert ds.class_names == [str(d) for d in range(10)]
  assert ds.num_classes == 10
  files = ds.split_files()
  assert sorted(files) == ['test', 'train', 'train_full', 'val']
  counts = np.bincount(targets, minlength=10)
  for split in ('train', 'val', 'test'):
    per_class = np.bincount(
      [int(os.path.dirname(f)) for f in files[split]], minlength=10
    )
    expected = [_sizes(n)[split] for n in counts]
    # The labels served are those of the files' class folders.
    np.testing.assert_array_equal(
      np.bincount(_labels(ds, split), minlength=10), per_class
    )
    assert ds.num_examples(split) == len(files[split])
  # Disjoint, together every file once; the final run trains on train + val.
  every = files['train'] + files['val'] + files['test']
  assert len(set(every)) == len(every) == 600
  assert files['train_full'] == sorted(files['train'] + files['val'])
  # The images are the scans.
  scans = np.round(sk_datasets.load_digits().images[:600] * 255 / 16)
  served = _pixels(ds, 'test')[..., 0]
  expected = scans[[int(os.path.basename(f)[:4]) for f in files['test']]]
  assert sorted(map(bytes, served)) == sorted(
    map(bytes, expected.astype(np.uint8))
  )


def test_held_out_splits_are_deterministic(digits_folder, mesh, tmp_path):
  root, _ = digits_folder
  first = data.get_dataset(_config(root), mesh).split_files()
  again = data.get_dataset(_config(root), mesh).split_files()
  assert first == again
  # They depend on the files alone, not on where the folder is, and a new
  # image in one class leaves the other classes' splits alone.
  copy = tmp_path / 'copy'
  shutil.copytree(root, copy)
  write_png(copy / '3' / '9999.png', 5)
  moved = data.get_dataset(_config(copy), mesh).split_files()
  for split in ('train', 'val', 'test'):
    assert [f for f in moved[split] if not f.startswith('3/')] == [
      f for f in first[split] if not f.startswith('3/')
    ]


def test_tiny_classes_keep_a_training_image(tmp_path, mesh):
  for name, n in (('one', 1), ('two', 2), ('three', 3), ('many', 25)):
    for i in range(n):
      write_png(tmp_path / name / f'{i}.png', i)
  files = data.get_dataset(_config(tmp_path), mesh).split_files()
  for name, n in (('one', 1), ('two', 2), ('three', 3), ('many', 25)):
    sizes = {
      s: sum(f.startswith(f'{name}/') for f in files[s])
      for s in ('train', 'test', 'val')
    }
    assert sizes == _sizes(n)
  assert [tuple(_sizes(n).values()) for n in (1, 2, 3, 25)] == [
    (1, 0, 0),
    (1, 1, 0),
    (1, 1, 1),
    (19, 3, 3),
  ]


def test_split_folders_cut_only_what_is_missing(tmp_path, mesh):
  for i in range(10):
    for name in ('a', 'b'):
      write_png(tmp_path / 'train' / name / f'{i}.png', i)
  for name in ('a', 'b'):
    write_png(tmp_path / 'test' / name / 'x.png', 100)
  ds = data.get_dataset(_config(tmp_path), mesh)
  # train/ and test/: val is 1 of each class's 10 training images.
  sizes = [ds.num_examples(s) for s in ('train', 'val', 'test', 'train_full')]
  assert sizes == [18, 2, 2, 20]
  assert ds.split_files()['test'] == ['test/a/x.png', 'test/b/x.png']

  for name in ('a', 'b'):
    write_png(tmp_path / 'validation' / name / 'v.png', 200)
  shutil.rmtree(tmp_path / 'test')
  ds = data.get_dataset(_config(tmp_path), mesh)
  # train/ and validation/: test is cut, and train_full is train/ alone.
  sizes = [ds.num_examples(s) for s in ('train', 'val', 'test', 'train_full')]
  assert sizes == [18, 2, 2, 18]
  assert np.all(_pixels(ds, 'val') == 200)


def test_unreadable_files_are_skipped_and_named(tmp_path, mesh, caplog):
  for split, n in (('train', 3), ('test', 2)):
    for label, name in enumerate(('cat', 'dog')):
      for i in range(n):
        write_png(tmp_path / split / name / f'{i}.png', 40 * label + i)
  broken = tmp_path / 'train' / 'dog' / 'broken.jpg'
  broken.write_bytes(b'this is not a jpeg')
  truncated_png = tmp_path / 'test' / 'cat' / 'truncated.png'
  png = (tmp_path / 'test' / 'cat' / '0.png').read_bytes()
  truncated_png.write_bytes(png[:60])
  # A JPEG cut short: TF would fill its missing rows with grey.
  truncated_jpeg = tmp_path / 'test' / 'dog' / 'cut.jpg'
  texture = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  Image.fromarray(texture).save(truncated_jpeg)
  jpeg = truncated_jpeg.read_bytes()
  truncated_jpeg.write_bytes(jpeg[: len(jpeg) // 2])
  (tmp_path / 'train' / 'cat' / 'notes.txt').write_text('not an image')

  with caplog.at_level(logging.WARNING):
    ds = data.get_dataset(_config(tmp_path), mesh)

  assert ds.class_names == ['cat', 'dog']
  assert ds.num_examples('train_full') == 6 and ds.num_examples('test') == 4
  messages = '\n'.join(r.getMessage() for r in caplog.records)
  assert 'Skipped 3 of 13 image files' in messages
  for path in (broken, truncated_png, truncated_jpeg):
    # One line per file: its path in the folder and why.
    assert messages.count(f'\n  {os.path.relpath(path, tmp_path)} (') == 1
  values = _pixels(ds, 'train_full')[:, 0, 0, 0]
  assert sorted(values) == [0, 1, 2, 40, 41, 42]


def _bmp_1bit(path):
  bits = np.random.default_rng(1).integers(0, 2, (8, 8)).astype(bool)
  Image.fromarray(bits).save(path)


def _bmp_palette(path):
  indices = np.random.default_rng(2).integers(0, 4, (8, 8), np.uint8)
  image = Image.fromarray(indices, 'P')
  image.putpalette([250, 10, 10, 10, 240, 10, 10, 10, 230, 200, 100, 50])
  image.save(path)


def _jpeg_cmyk(path):
  cmyk = np.random.default_rng(3).integers(0, 256, (8, 8, 4), np.uint8)
  Image.fromarray(cmyk, 'CMYK').save(path, quality=95)


def test_images_decode_as_pil_shows_them(tmp_path, mesh):
  paths = []
  for name, write in (
    ('bits.bmp', _bmp_1bit),
    ('palette.bmp', _bmp_palette),
    ('cmyk.jpg', _jpeg_cmyk),
  ):
    for label in ('a', 'b'):
      (tmp_path / label).mkdir(exist_ok=True)
      write(tmp_path / label / name)
      paths.append(tmp_path / label / name)
  assert Image.open(paths[2]).mode == 'P'  # An 8-bit palette BMP.
  assert Image.open(paths[0]).mode == '1'
  config = _config(tmp_path)
  config.splits.val = 'train+val+test'  # Every image, once.
  ds = data.get_dataset(config, mesh)
  expected = [np.asarray(Image.open(p).convert('RGB')) for p in paths]
  served = _pixels(ds, 'val')
  assert sorted(map(bytes, served)) == sorted(map(bytes, expected))
  # And through the training pipeline's decoder.
  batch = next(ds.local_train_iter(split='val'))
  train = np.round((batch['images'] + 1) * 127.5).astype(np.uint8)
  assert set(map(bytes, train)) <= set(map(bytes, expected))


def test_empty_class_folders_are_errors(tmp_path, mesh):
  write_png(tmp_path / 'a' / '0.png', 1)
  (tmp_path / 'b').mkdir()
  with pytest.raises(ValueError, match=f"class folder '{tmp_path}/b' has no"):
    data.get_dataset(_config(tmp_path), mesh)
  # A class whose only file is unreadable is empty too.
  (tmp_path / 'b' / 'broken.png').write_bytes(b'not a png')
  with pytest.raises(ValueError, match=f"'{tmp_path}/b' has no readable"):
    data.get_dataset(_config(tmp_path), mesh)


def test_layout_errors(tmp_path, mesh):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.get_dataset(_config(tmp_path / 'missing'), mesh)
  with pytest.raises(ValueError, match='has no class folders'):
    data.get_dataset(_config(tmp_path), mesh)

  write_png(tmp_path / 'train' / 'a' / '0.png', 1)
  write_png(tmp_path / 'extra' / 'a' / '0.png', 1)
  with pytest.raises(ValueError, match=r"mixes split folders \['train'\]"):
    data.get_dataset(_config(tmp_path), mesh)
  shutil.rmtree(tmp_path / 'extra')

  write_png(tmp_path / 'train' / 'b' / '0.png', 2)
  write_png(tmp_path / 'test' / 'a' / '0.png', 3)
  write_png(tmp_path / 'test' / 'c' / '0.png', 4)
  with pytest.raises(ValueError, match=r"only in train/: \['b'\].*\['c'\]"):
    data.get_dataset(_config(tmp_path), mesh)
  shutil.rmtree(tmp_path / 'test' / 'c')
  write_png(tmp_path / 'test' / 'b' / '0.png', 4)
  with pytest.raises(ValueError, match=r'config\.splits\.val'):
    data.get_dataset(_config(tmp_path, splits={'val': 'validation'}), mesh)

  shutil.move(tmp_path / 'train', tmp_path / 'val')
  with pytest.raises(ValueError, match='no train/'):
    data.get_dataset(_config(tmp_path), mesh)

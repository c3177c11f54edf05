"""Writes scikit-learn's digit scans as a folder of PNGs, one per class.

  python -m vit_jax.data.write_digits_folder /tmp/digits_png

gives /tmp/digits_png/<zero|one|...|nine>/<index>.png: the 1,797 8x8 grey
scans that ship with scikit-learn, with no train/ or test/ folders. It is a
stand-in for a folder of your own images, built without a download, to
try `--config=configs/finetune.py:MODEL,/tmp/digits_png` on.
"""

import argparse
import os

from PIL import Image

from vit_jax.data.sources.arrays import digit_scans

# Words rather than digits: the class ids (the sorted folder names) then
# differ from the digits, and predictions show names from the folder.
CLASS_NAMES = (
  'zero',
  'one',
  'two',
  'three',
  'four',
  'five',
  'six',
  'seven',
  'eight',
  'nine',
)


def write_digits_folder(root: str) -> int:
  """Writes root/<class>/<index>.png for every scan; returns how many."""
  images, digits = digit_scans()
  for name in CLASS_NAMES:
    os.makedirs(os.path.join(root, name), exist_ok=True)
  for index, (image, digit) in enumerate(zip(images, digits, strict=True)):
    path = os.path.join(root, CLASS_NAMES[digit], f'{index:04d}.png')
    Image.fromarray(image).save(path)  # 8-bit grey
  return len(images)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('root', help='the folder to write (created if needed)')
  root = parser.parse_args().root
  print(f'Wrote {write_digits_folder(root)} images under {root}.')


if __name__ == '__main__':
  main()

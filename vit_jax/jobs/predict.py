"""The predict job: the top-k classes of image files, from a checkpoint.

  python main.py --config=configs/predict.py --config.init=CKPT \
      --config.images=a.png,b.jpg --config.dataset=digits --workdir=DIR

Each image (JPEG, PNG, GIF or BMP) is preprocessed as training's evaluation
preprocesses it (`data.preprocess.eval_fn`: the `config.pp.eval_crop` resize
or central crop to the checkpoint's resolution, values to [-1, 1]). Class
names come from `config.class_names`, a text file with one name per line;
else from the checkpoint, where training saved them (its dataset's names:
an image folder's class folders); else from `config.dataset`; else classes
are numbered.
Probabilities are the softmax of the logits, or per-class sigmoids for a
model trained with `--config.loss=sigmoid_xent`. Prints a table and writes
DIR/predictions.json.
"""

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from etils import epath

from vit_jax import config_utils
from vit_jax import workdir as workdir_lib
from vit_jax.data import preprocess
from vit_jax.jobs import common


def class_names(
  loaded: common.LoadedModel, num_classes: int
) -> tuple[list[str], str]:
  """The names of the model's classes, and where they came from."""
  config = loaded.config
  if config.class_names:
    path = epath.Path(config.class_names)
    if not path.exists():
      raise FileNotFoundError(f'config.class_names={path} does not exist.')
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [name for name in names if name]
    origin = str(path)
  elif loaded.description.class_names is not None:
    names = list(loaded.description.class_names)
    origin = f'{config.init} (checkpoint)'
  elif config.dataset:
    names = loaded.dataset().class_names or []
    origin = config.dataset
  else:
    return [f'class {i}' for i in range(num_classes)], 'numbered'
  if len(names) != num_classes:
    raise ValueError(
      f'{origin} gives {len(names)} class names, but the model has '
      f'{num_classes} classes; set --config.class_names to a file with one '
      'name per line, or --config.dataset to the dataset it was trained on.'
    )
  return names, origin


def load_images(
  paths: Sequence[str], pp: ml_collections.ConfigDict, image_size: int
) -> np.ndarray:
  """Files -> (N, size, size, 3) float32 in [-1, 1], as evaluation sees them."""
  fn = preprocess.eval_fn(
    pp, image_size=image_size, num_classes=1, loss='softmax_xent'
  )
  images = []
  for path in paths:
    path = epath.Path(path)
    if not path.exists():
      raise FileNotFoundError(f'No image at {path}.')
    record = {'image': tf.constant(path.read_bytes()), 'label': tf.constant(0)}
    try:
      images.append(fn(record)['images'].numpy())
    except tf.errors.InvalidArgumentError as e:
      raise ValueError(
        f'{path} is not an image that can be decoded (JPEG, PNG, GIF or '
        f'BMP): {e.message}'
      ) from e
  return np.stack(images)


def probabilities(logits: np.ndarray, loss: str) -> np.ndarray:
  """Softmax over classes, or independent sigmoids for sigmoid_xent."""
  logits = np.asarray(logits, np.float64)
  if loss == 'sigmoid_xent':
    return 1.0 / (1.0 + np.exp(-logits))
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return shifted / shifted.sum(axis=-1, keepdims=True)


def predict(loaded: common.LoadedModel) -> dict[str, Any]:
  """The top-k classes and probabilities of `config.images`."""
  config = loaded.config
  paths = config_utils.names(config.images)
  if not paths:
    raise ValueError('Set --config.images to image files, comma-separated.')
  num_classes = loaded.require_head('predict')
  names, origin = class_names(loaded, num_classes)
  images = load_images(paths, config.pp, loaded.image_size)
  apply = jax.jit(lambda v, x: loaded.model.apply(v, x, train=False))
  # A few images on one device: host variables, no mesh.
  probs = probabilities(
    np.asarray(apply(loaded.variables, images)), config.loss
  )
  top_k = min(config.top_k, num_classes)
  predictions = []
  for path, row in zip(paths, probs, strict=True):
    ranked = np.argsort(-row, kind='stable')[:top_k]
    predictions.append(
      {
        'image': path,
        'top_k': [
          {'label': int(i), 'class': names[i], 'probability': float(row[i])}
          for i in ranked
        ],
      }
    )
  return {
    'model': loaded.model_name,
    'checkpoint': config.init,
    'image_size': loaded.image_size,
    'class_names': origin,
    'probabilities': 'sigmoid' if config.loss == 'sigmoid_xent' else 'softmax',
    'predictions': predictions,
  }


def format_table(results: dict[str, Any]) -> str:
  """One line per (image, rank): the class and its probability."""
  rows = [('image', 'rank', 'class', 'probability')]
  for prediction in results['predictions']:
    for rank, entry in enumerate(prediction['top_k'], start=1):
      image = prediction['image'] if rank == 1 else ''
      rows.append(
        (image, str(rank), entry['class'], f'{entry["probability"]:.4f}')
      )
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  return '\n'.join(
    '  '.join(
      cell.ljust(width) for cell, width in zip(row, widths, strict=True)
    ).rstrip()
    for row in rows
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  loaded = common.start(config, workdir)
  results = predict(loaded)
  workdir_lib.write_json(workdir, 'predictions.json', results)
  if jax.process_index() == 0:
    print(format_table(results))
  return results

"""The inspect job: the paper's figures of what a ViT learned (Figs. 6, 7).

  python main.py --config=configs/inspect.py --config.init=CKPT --workdir=DIR

writes to DIR:
  embedding_filters.png    the top principal components of the patch-
                           embedding filters, as RGB tiles;
  position_similarity.png  the cosine similarity of each patch's position
                           embedding with all others, a grid of grids;
  attention_distance.png   mean attention distance in pixels of every head
                           against depth, over `config.num_images` images;
  attention_rollout.png    attention rollout from the class token to the
                           patches over the first `config.rollout_images`;
  inspect.json             the distances, rollout maps and what was drawn.
Images come from `config.split` of `config.dataset` (the digits by default),
preprocessed for evaluation at the checkpoint's resolution. A figure that
does not apply to the model (filters of a hybrid's 1x1 embedding, rollout
without a class token) is skipped and the reason recorded.
"""

from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from vit_jax import workdir as workdir_lib
from vit_jax.analysis import attention_maps, inspection
from vit_jax.jobs import common
from vit_jax.models import VisionTransformer, shapes

FILTERS = 'embedding_filters.png'
POSITIONS = 'position_similarity.png'
DISTANCES = 'attention_distance.png'
ROLLOUT = 'attention_rollout.png'


def dataset_images(
  loaded: common.LoadedModel, split: str, count: int
) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` images of a split and their (top) labels, numpy."""
  images, labels, total = [], [], 0
  for batch in loaded.dataset().local_eval_iter(split):
    keep = batch['mask'] > 0
    images.append(batch['images'][keep])
    labels.append(batch['labels'][keep].argmax(axis=-1))
    total += int(keep.sum())
    if total >= count:
      break
  return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def _num_components(params, wanted: int) -> int:
  """At most `wanted`, and no more than the filters have."""
  patch, _, channels, hidden = params['embedding']['kernel'].shape
  return min(wanted, hidden, patch * patch * channels)


def _attention_figures(loaded, images, labels, workdir, results) -> None:
  """Mean attention distance and, with a class token, attention rollout."""
  config, model, variables = loaded.config, loaded.model, loaded.variables
  distances = attention_maps.mean_attention_distance(
    model, variables, images, config.inspect_batch_size
  )
  inspection.attention_distance_figure(distances, workdir / DISTANCES)
  results['figures'].append(DISTANCES)
  results['mean_attention_distance'] = distances
  results['mean_attention_distance_per_layer'] = distances.mean(axis=1)

  if loaded.has_class_token:
    shown = images[: config.rollout_images]
    maps = attention_maps.rollout_maps(
      model, variables, shown, config.inspect_batch_size
    )
    inspection.rollout_figure(shown, maps, workdir / ROLLOUT)
    results['figures'].append(ROLLOUT)
    results['rollout_labels'] = labels[: len(shown)]
    results['rollout_maps'] = maps
  else:
    results['skipped'][ROLLOUT] = (
      f'classifier={model.classifier!r} has no class token to roll out from.'
    )


def inspect(loaded: common.LoadedModel, workdir: str) -> dict[str, Any]:
  """Draws the figures into `workdir`; returns the numbers behind them."""
  config, model = loaded.config, loaded.model
  if not isinstance(model, VisionTransformer):
    raise ValueError(
      f'{loaded.model_name} has no attention or position embeddings to '
      'inspect; use a ViT, R50+ViT hybrid or ViTc checkpoint.'
    )
  workdir = epath.Path(workdir)
  # Small models on one device: host variables, unsharded images.
  variables = loaded.variables
  images, labels = dataset_images(loaded, config.split, config.num_images)
  rows, cols, stride = shapes.token_grid(model, *images.shape[1:3])
  results: dict[str, Any] = {
    'model': loaded.model_name,
    'checkpoint': config.init,
    'dataset': config.dataset,
    'split': config.split,
    'image_size': loaded.image_size,
    'num_images': len(images),
    'token_grid': [rows, cols],
    'token_stride_pixels': stride,
    'figures': [],
    'skipped': {},
  }

  try:
    inspection.embedding_filters_figure(
      variables,
      workdir / FILTERS,
      _num_components(variables['params'], config.num_components),
    )
    results['figures'].append(FILTERS)
  except ValueError as e:  # A 1x1 embedding of a feature map.
    results['skipped'][FILTERS] = str(e)

  inspection.position_similarity_figure(
    variables, workdir / POSITIONS, loaded.has_class_token
  )
  results['figures'].append(POSITIONS)

  _attention_figures(loaded, images, labels, workdir, results)
  return results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  loaded = common.start(config, workdir)
  if jax.process_index() != 0:
    return {}  # The figures need no other process.
  results = inspect(loaded, workdir)
  workdir_lib.write_json(workdir, 'inspect.json', results)
  per_layer = ', '.join(
    f'{d:.1f}' for d in results['mean_attention_distance_per_layer']
  )
  print(
    f'Wrote {", ".join(results["figures"])} and inspect.json to {workdir}. '
    f'Mean attention distance per layer (pixels): {per_layer}.'
  )
  for figure, reason in results['skipped'].items():
    print(f'Skipped {figure}: {reason}')
  return results

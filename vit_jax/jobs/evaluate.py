"""The evaluate job: a checkpoint's top-1 accuracy on a dataset split.

  python main.py --config=configs/evaluate.py --config.init=CKPT \
      --config.dataset=cifar10 --config.eval_split=test --workdir=DIR

Runs the classification evaluator once (vit_jax/evaluators): every example
of the split counts exactly once, and where the labels are sets (e.g.
`--config.dataset=imagenet2012_real`) the accuracy is ImageNet ReaL's.
Writes DIR/evaluate.json, with the class names where the checkpoint or the
dataset has them. A checkpoint whose saved class names are the dataset's in
another order is an error: its outputs would be scored against the wrong
labels.
"""

from typing import Any

import ml_collections
from absl import logging

from vit_jax import evaluators
from vit_jax import workdir as workdir_lib
from vit_jax.jobs import common


def evaluate(loaded: common.LoadedModel, split: str) -> dict[str, Any]:
  """Accuracy and mean loss of a loaded checkpoint on a split."""
  config = loaded.config
  num_classes = loaded.require_head('evaluate')
  context = loaded.eval_context()
  ds = context.dataset()
  if ds.num_classes != num_classes:
    raise ValueError(
      f'{config.init} has {num_classes} classes but {config.dataset} has '
      f'{ds.num_classes}; evaluate it on the dataset it was trained or '
      'fine-tuned on.'
    )
  names = _class_names(loaded.description.class_names, ds.class_names, config)
  evaluator = evaluators.ClassificationEvaluator(
    context, name='evaluate', split=split
  )
  metrics = evaluator.run(loaded.on_mesh())
  return {
    'model': loaded.model_name,
    'checkpoint': config.init,
    'dataset': config.dataset,
    'split': split,
    'image_size': loaded.image_size,
    **metrics,
    **({'class_names': names} if names else {}),
  }


def _class_names(saved, dataset, config) -> list[str] | None:
  """The checkpoint's class names (else the dataset's), checked."""
  if saved is None or dataset is None:
    return list(saved or dataset or []) or None
  saved, dataset = list(saved), list(dataset)
  if saved != dataset and sorted(saved) == sorted(dataset):
    raise ValueError(
      f'{config.init} was trained on the classes of {config.dataset} in '
      f'another order ({saved} against {dataset}): its outputs do not match '
      "the dataset's labels. Evaluate it on the data it was trained on."
    )
  if saved != dataset:
    logging.warning(
      '%s names its classes %s; %s names them %s.',
      config.init, saved, config.dataset, dataset,
    )  # fmt: skip
  return saved


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  loaded = common.start(config, workdir)
  results = evaluate(loaded, config.eval_split)
  workdir_lib.write_json(workdir, 'evaluate.json', results)
  metric = 'real_accuracy' if 'real_accuracy' in results else 'accuracy'
  print(
    f'{results["model"]} on {config.dataset} {config.eval_split}: '
    f'{metric} {100 * results[metric]:.2f}% over {results["examples"]} '
    'examples'
  )
  return results

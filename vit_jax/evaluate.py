"""The evaluate job: a checkpoint's top-1 accuracy on a dataset split.

  python main.py --config=configs/evaluate.py --config.init=CKPT \
      --config.dataset=cifar10 --config.eval_split=test --workdir=DIR

Every example of the split counts exactly once: the last batch is padded and
its padding masked, and the job checks the count against the split's size.
Where the labels are sets (e.g. `--config.dataset=imagenet2012_real`) the
accuracy is ImageNet ReaL's: a top-1 prediction is right if its class is in
the example's set, and examples with an empty set do not count. Writes
DIR/evaluate.json.
"""

from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import checkpoint_jobs, steps


def split_metrics(loss_fn: steps.LossFn) -> steps.EvalMetrics:
  """Top-1 (or ReaL) accuracy and mean loss, plus what the split held.

  On top of `steps.classification_metrics`: 'seen', the number of real
  (unmasked) examples, and 'label_sets', whether any of them has other than
  exactly one label (a ReaL-style set).
  """
  base = steps.classification_metrics(loss_fn)

  def sums(logits, labels, mask):
    positives = jnp.sum(labels > 0, axis=-1)
    return {
      **base.sums(logits, labels, mask),
      'seen': jnp.sum(mask),
      'not_single': jnp.sum(mask * (positives != 1)),
    }

  def summarize(totals: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
      **base.summarize(totals),
      'seen': int(totals['seen']),
      'label_sets': bool(totals['not_single'] > 0),
    }

  return steps.EvalMetrics(sums, summarize)


def evaluate(ckpt: checkpoint_jobs.Checkpoint, split: str) -> dict[str, Any]:
  """Accuracy and mean loss of a loaded checkpoint on a split."""
  config = ckpt.config
  num_classes = ckpt.require_head('evaluate')
  ds = ckpt.dataset()
  if ds.num_classes != num_classes:
    raise ValueError(
      f'{config.init} has {num_classes} classes but {config.dataset} has '
      f'{ds.num_classes}; evaluate it on the dataset it was trained or '
      'fine-tuned on.'
    )
  loss_fn = steps.get_loss(config.loss)
  metrics = split_metrics(loss_fn)
  with ckpt.activation_sharding():
    eval_step = steps.make_eval_step(
      ckpt.model, loss_fn, ckpt.mesh, metrics=metrics
    )
    totals = steps.evaluate(
      eval_step, ckpt.on_mesh(), ds.eval_iter(split), metrics.summarize
    )
  expected = ds.num_examples(split)
  if totals['seen'] != expected:
    raise RuntimeError(
      f'Evaluated {totals["seen"]} examples of the {split!r} split of '
      f'{config.dataset}, which has {expected}.'
    )
  name = 'real_accuracy' if totals['label_sets'] else 'accuracy'
  return {
    'model': ckpt.model_name,
    'checkpoint': config.init,
    'dataset': config.dataset,
    'split': split,
    'image_size': ckpt.image_size,
    name: totals['accuracy'],
    'loss': totals['loss'],
    'examples': totals['seen'],
    # With label sets, the examples whose set is not empty.
    'examples_scored': totals['examples'],
  }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  ckpt = checkpoint_jobs.start(config, workdir)
  results = evaluate(ckpt, config.eval_split)
  checkpoint_jobs.write_json(workdir, 'evaluate.json', results)
  metric = 'real_accuracy' if 'real_accuracy' in results else 'accuracy'
  print(
    f'{results["model"]} on {config.dataset} {config.eval_split}: '
    f'{metric} {100 * results[metric]:.2f}% over {results["examples"]} '
    'examples'
  )
  return results

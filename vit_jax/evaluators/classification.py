"""Evaluation on a split: every example exactly once.

The metrics are the objective's (top-1 accuracy and mean loss for a
classifier). The last batch is padded and its padding masked, and the count
of examples seen is checked against the split's size. Where the labels are
sets (e.g. `imagenet2012_real`) the accuracy is ImageNet ReaL's, reported as
`real_accuracy`: a top-1 prediction is right if its class is in the
example's set, and examples with an empty set do not count.
"""

from typing import Any

import jax.numpy as jnp
import numpy as np

from vit_jax import eval_step
from vit_jax.evaluators.base import Context


def counted(
  metrics: eval_step.EvalMetrics, labels: bool
) -> eval_step.EvalMetrics:
  """`metrics` plus 'seen', the real examples, and whether labels are sets.

  Args:
    metrics: the objective's evaluation metrics.
    labels: whether the targets are (multi-hot) labels; then 'label_sets'
      says whether any example has other than exactly one label.
  """

  def sums(outputs, targets, mask):
    extra = {'seen': jnp.sum(mask)}
    if labels:
      positives = jnp.sum(targets > 0, axis=-1)
      extra['not_single'] = jnp.sum(mask * (positives != 1))
    return {**metrics.sums(outputs, targets, mask), **extra}

  def summarize(totals: dict[str, np.ndarray]) -> dict[str, Any]:
    summary = {**metrics.summarize(totals), 'seen': int(totals['seen'])}
    if labels and totals['not_single'] > 0:
      summary['real_accuracy'] = summary.pop('accuracy')
    return summary

  return eval_step.EvalMetrics(sums, summarize)


class ClassificationEvaluator:
  """The objective's metrics on one split of a dataset.

  Config keys: `split` (default 'val'), `dataset` (default: the job's),
  `every` (steps, 0: not during training), `final` (default True).
  """

  def __init__(
    self,
    context: Context,
    *,
    name: str,
    split: str = 'val',
    dataset: str | None = None,
    every: int = 0,
    final: bool = True,
  ):
    self.name, self.every, self.final = name, every, final
    self.split = split
    self._context = context
    self._dataset = context.dataset(dataset)
    task = context.task
    self._metrics = counted(task.eval_metrics, task.target == 'labels')
    with context.activation_sharding():
      self._step = eval_step.make_eval_step(
        task.model,
        task.loss_fn,
        context.mesh,
        metrics=self._metrics,
        target=task.target,
        rng_streams=task.rng_streams,
        seed=context.config.seed,
      )

  def run(self, variables) -> dict[str, Any]:
    """Metrics over every example of the split; 'examples' is their count."""
    with self._context.activation_sharding():
      metrics = eval_step.evaluate(
        self._step,
        variables,
        self._dataset.eval_iter(self.split),
        self._metrics.summarize,
      )
    expected = self._dataset.num_examples(self.split)
    seen = metrics.pop('seen')
    if seen != expected:
      raise RuntimeError(
        f'Evaluated {seen} examples of the {self.split!r} split of '
        f'{self._context.config.dataset}, which has {expected}.'
      )
    # With label sets, 'examples' counts those whose set is not empty.
    metrics['examples_scored'] = metrics.get('examples', seen)
    metrics['examples'] = seen
    return metrics

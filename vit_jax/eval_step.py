"""The evaluation step: sums of metrics over padded, masked batches.

`make_eval_step` compiles `(variables, batch) -> sums` for an `EvalMetrics`;
`evaluate` adds the sums up over a split and summarizes them. Padding
examples (mask 0) never count, so every example of a split counts once.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vit_jax import sharding
from vit_jax.steps import LossFn, model_rngs

# An evaluation's totals over a split -> the metrics reported.
Summarize = Callable[[dict[str, np.ndarray]], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class EvalMetrics:
  """What evaluation measures.

  Attributes:
    sums: (model outputs, targets, mask) -> a dict of sums over the batch,
      where mask is 1 for the examples of the split and 0 for padding; they
      are added up over the split.
    summarize: the split's totals (numpy) -> the metrics reported.
  """

  sums: Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]
  summarize: Summarize


def _classification_summary(totals: dict[str, np.ndarray]) -> dict[str, float]:
  count = max(float(totals['count']), 1.0)
  return {
    'accuracy': float(totals['correct']) / count,
    'loss': float(totals['loss_sum']) / count,
    'examples': int(totals['count']),
  }


def classification_metrics(loss_fn: LossFn) -> EvalMetrics:
  """Top-1 accuracy and mean loss of logits against (multi-hot) labels.

  A prediction is correct when its top-1 class has a positive label: plain
  top-1 accuracy for one-hot labels, and ReaL accuracy for multi-hot label
  sets, where examples with an empty set do not count (as in ImageNet ReaL).
  Padding examples (mask 0) never count.
  """

  def sums(logits, labels, mask):
    valid = mask * (jnp.max(labels, axis=-1) > 0)
    top1 = jnp.argmax(logits, axis=-1)
    correct = jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
    return {
      'correct': jnp.sum(correct * valid),
      'count': jnp.sum(valid),
      'loss_sum': jnp.sum(loss_fn(logits, labels) * valid),
    }

  return EvalMetrics(sums, _classification_summary)


def make_eval_step(
  model: nn.Module,
  loss_fn: LossFn,
  mesh: Mesh,
  *,
  metrics: EvalMetrics | None = None,
  target: str = 'labels',
  rng_streams: Sequence[str] = (),
  seed: int = 0,
) -> Callable[[dict, dict[str, jax.Array]], dict[str, jax.Array]]:
  """Builds the compiled `(variables, batch) -> sums` evaluation step.

  Args:
    model: the Flax module.
    loss_fn: per-example loss of (model outputs, targets).
    mesh: the device mesh.
    metrics: what to measure; `classification_metrics(loss_fn)` by default.
    target: the batch entry the outputs are compared with.
    rng_streams: RNG streams the model draws from (besides 'dropout').
    seed: their keys are derived from it, the same for every batch.
  """
  metrics = metrics or classification_metrics(loss_fn)

  def eval_step(variables, batch):
    outputs = model.apply(
      variables,
      batch['images'],
      train=False,
      rngs=model_rngs(jax.random.key(seed), rng_streams),
    )
    return metrics.sums(outputs, batch[target], batch['mask'])

  return jax.jit(
    eval_step,
    in_shardings=(None, sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def evaluate(
  eval_step: Callable,
  variables: dict,
  batches,
  summarize: Summarize = _classification_summary,
) -> dict[str, float]:
  """The metrics of an iterable of padded, masked batches.

  `summarize` turns the eval step's totals into metrics (`EvalMetrics`); the
  default gives the accuracy, mean loss and examples of
  `classification_metrics`.
  """
  totals: dict[str, Any] = {}
  for batch in batches:
    sums = eval_step(variables, batch)
    totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
  if not totals:
    raise ValueError('The evaluation split is empty.')
  return summarize(jax.device_get(totals))

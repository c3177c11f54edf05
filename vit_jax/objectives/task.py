"""The Task: what a job plugs into the training loop."""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import ml_collections

from vit_jax import eval_step, models, steps
from vit_jax.models.description import ModelDescription

PyTree = Any


@dataclasses.dataclass
class Task:
  """What a job plugs into the loop.

  Attributes:
    model: the Flax module trained.
    loss_fn: per-example loss of (model outputs, targets).
    description: the model description saved with every checkpoint; a
      workdir is only resumed by a task with the same description.
    initial_variables: returns host variables for the first state (e.g. a
      pretrained checkpoint adapted to `model`); None for a random init.
    target: the batch entry the outputs are compared with: 'labels', or
      'images' for a self-supervised objective.
    rng_streams: RNG streams the model draws from besides 'dropout' (keys
      derived from the seed and step in training, from the seed in
      evaluation).
    eval_metrics: what evaluation reports; top-1 accuracy and mean loss
      (`eval_step.classification_metrics`) by default.
  """

  model: nn.Module
  loss_fn: steps.LossFn
  description: ModelDescription
  initial_variables: Callable[[], PyTree] | None = None
  target: str = 'labels'
  rng_streams: tuple[str, ...] = ()
  eval_metrics: eval_step.EvalMetrics | None = None

  def __post_init__(self):
    if self.eval_metrics is None:
      self.eval_metrics = eval_step.classification_metrics(self.loss_fn)


def model_from_config(
  config: ml_collections.ConfigDict, num_classes: int | None
) -> tuple[nn.Module, ModelDescription]:
  """The model a config names, and its description."""
  description = ModelDescription(
    model_name=config.model_name,
    num_classes=num_classes,
    image_size=config.image_size,
    overrides=models.config_overrides(config.model),
  )
  return description.build(), description

"""Supervised training: the configured model learns the dataset's labels."""

import ml_collections

from vit_jax import data, steps
from vit_jax.objectives.task import Task, model_from_config

OBJECTIVE = 'supervised'


def make_task(config: ml_collections.ConfigDict, ds: 'data.Dataset') -> Task:
  """The configured model, loss and the dataset's classes (and names)."""
  num_classes = config.num_classes or ds.num_classes
  if num_classes != ds.num_classes:
    raise ValueError(
      f'config.num_classes={config.num_classes}, but {config.dataset} has '
      f'{ds.num_classes} classes; set --config.num_classes={ds.num_classes} '
      'or leave it unset.'
    )
  model, description = model_from_config(config, num_classes, ds.class_names)
  return Task(
    model=model,
    loss_fn=steps.get_loss(config.loss, config.label_smoothing),
    description=description,
  )

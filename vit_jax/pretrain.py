"""The pretraining job: a model trained from scratch on the shared loop.

`config.objective` picks what it learns: 'supervised' (the labels) or
'masked_patch_prediction' (self-supervised, vit_jax/mpp.py).
"""

import ml_collections

from vit_jax import data, fewshot_job, loop, mpp, steps

SUPERVISED = 'supervised'
OBJECTIVES = (SUPERVISED, mpp.OBJECTIVE)


def make_task(config: ml_collections.ConfigDict, ds: data.Dataset) -> loop.Task:
  """The Task of `config.objective`."""
  if config.objective == mpp.OBJECTIVE:
    return mpp.make_task(config, ds)
  if config.objective != SUPERVISED:
    raise ValueError(
      f'config.objective={config.objective!r}; use one of {OBJECTIVES}.'
    )
  return supervised_task(config, ds)


def supervised_task(
  config: ml_collections.ConfigDict, ds: data.Dataset
) -> loop.Task:
  """Supervised pretraining: the configured model, loss and classes."""
  num_classes = config.num_classes or ds.num_classes
  if num_classes != ds.num_classes:
    raise ValueError(
      f'config.num_classes={config.num_classes}, but {config.dataset} has '
      f'{ds.num_classes} classes; set --config.num_classes={ds.num_classes} '
      'or leave it unset.'
    )
  model, description = loop.model_from_config(config, num_classes)
  return loop.Task(
    model=model,
    loss_fn=steps.get_loss(config.loss, config.label_smoothing),
    description=description,
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  return loop.train_and_evaluate(
    config, workdir, fewshot_job.with_periodic_probes(make_task)
  )

"""The fine-tuning job: a pretrained checkpoint transferred to a new task.

It runs on the same loop as pretraining (sharding, checkpoints, resume,
logging); what differs is the task: the model is rebuilt with the pretrained
architecture and the new classes and resolution, and its first state comes
from the adapted checkpoint (vit_jax/checkpoints/transfer.py).

With `config.sweep`, every learning rate of `config.lr_grid` trains on the
'train' split and is scored on the held-out 'val' split; the best one
retrains on 'train_full' and is scored on 'test' (the paper's protocol). The
results table goes to results.md and results.json in the workdir.

A config whose `total_steps` is None (the recipe of a folder of images,
configs/common.py) has its length resolved from the number of training
images before it runs (`steps_from_data`); the resolved values are in the
workdir's config.json.
"""

import copy
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vit_jax import checkpoints, data, loop, models, sharding, steps
from vit_jax import workdir as workdir_lib
from vit_jax.checkpoints import transfer
from vit_jax.models import shapes
from vit_jax.models.description import ModelDescription
from vit_jax.objectives import Task

RANDOM_INIT = 'random'


def _check_same_model(config, description):
  if description and description.model_name != config.model_name:
    raise ValueError(
      f'config.init={config.init} holds a {description.model_name} '
      f'checkpoint, but the config fine-tunes {config.model_name}; use '
      f'--config=configs/finetune.py:{description.model_name},'
      f'{config.dataset}.'
    )


def make_task(config: ml_collections.ConfigDict, ds: data.Dataset) -> Task:
  """The pretrained architecture with a new head, at the new resolution."""
  if not config.init:
    raise ValueError(
      'Set --config.init to the checkpoint to fine-tune (a .npz file, or a '
      f"workdir or checkpoint directory), or to '{RANDOM_INIT}' to train "
      'the same recipe from a random initialisation.'
    )
  if config.init == RANDOM_INIT:
    variables, description = None, None
  else:
    variables, description = checkpoints.read(
      config.init,
      model_name=config.model_name,
      weights_cache=config.get('weights_cache'),
      **models.config_overrides(config.model),
    )
    _check_same_model(config, description)
  overrides = description.architecture() if description else {}
  overrides.update(models.config_overrides(config.model))
  overrides['head_bias_init'] = 0.0
  representation = None
  if config.keep_representation and variables is not None:
    pre_logits = variables['params'].get(transfer.REPRESENTATION)
    if pre_logits is not None:
      representation = int(pre_logits['kernel'].shape[-1])
  overrides['representation_size'] = representation
  description = ModelDescription(
    model_name=config.model_name,
    num_classes=ds.num_classes,
    image_size=config.image_size,
    overrides=overrides,
    class_names=ds.class_names,
  )
  model = description.build()

  def initial_variables():
    target = shapes.abstract_variables(model, config.image_size)
    return checkpoints.transfer(variables, target)

  return Task(
    model=model,
    loss_fn=steps.get_loss(config.loss, config.label_smoothing),
    description=description,
    initial_variables=None if variables is None else initial_variables,
  )


# Table 4's warm-ups: 50 of 500 steps, 500 of 10k and 20k.
_WARMUP_FRACTION = 0.1
_MAX_WARMUP = 500


def steps_from_data(
  config: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
  """The config with a length left to the data resolved.

  Where `config.total_steps` is None: the batch is clipped to the training
  images (a multiple of the data-parallel devices) and the run takes
  `config.num_epochs`, if set, or `steps_from_data.epochs` clipped to
  [min_steps, max_steps]. A warm-up left None is a tenth of the steps, at
  most 500.

  Args:
    config: a fine-tuning config.

  Returns:
    A copy with `total_steps` and `lr.warmup_steps` set (the config itself
    where both are).
  """
  if config.total_steps is not None and config.lr.warmup_steps is not None:
    return config
  config = copy.deepcopy(config)
  if config.total_steps is None:
    # The loop opens the data again with the resolved batch size; for a
    # folder that is a second scan of its files.
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.model)
    ds = data.get_dataset(config, mesh)
    images = ds.num_examples(config.train_split)
    devices = mesh.shape[sharding.DATA]
    if images < config.batch_size:
      config.batch_size = max(devices, images // devices * devices)
    if config.num_epochs is not None:
      config.total_steps = loop.total_steps(config, ds)
    else:
      rule = config.steps_from_data
      steps = round(rule.epochs * images / config.batch_size)
      config.total_steps = int(np.clip(steps, rule.min_steps, rule.max_steps))
    logging.info(
      '%s: %d training images; batch %d, %d steps.',
      config.dataset, images, config.batch_size, config.total_steps,
    )  # fmt: skip
  if config.lr.warmup_steps is None and config.lr.warmup_epochs is None:
    config.lr.warmup_steps = min(
      _MAX_WARMUP, round(_WARMUP_FRACTION * config.total_steps)
    )
  return config


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """One fine-tuning run (exported as workdir/model.npz if export_npz)."""
  return loop.train_and_evaluate(steps_from_data(config), workdir, make_task)


def _run_config(config, changes: dict[str, Any]):
  run = copy.deepcopy(config)
  run.update_from_flattened_dict(changes)
  return run


def sweep(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The paper's protocol: select the learning rate on 'val', test once."""
  workdir = epath.Path(workdir)
  finished = loop.finished_results(workdir)
  if finished is not None:
    logging.info('The sweep in %s has finished: nothing to do.', workdir)
    return finished
  scores = {}
  for lr in config.lr_grid:
    run = _run_config(config, {
      'lr.base': lr, 'train_split': 'train', 'eval_split': 'val',
      'test_split': None, 'export_npz': False,
    })  # fmt: skip
    results = train(run, str(workdir / f'lr_{lr:g}'))
    if 'preempted_at_step' in results:
      return results
    scores[lr] = results['eval_accuracy']
  best = max(scores, key=scores.get)
  final = _run_config(config, {
    'lr.base': best, 'train_split': 'train_full', 'eval_split': 'test',
    'test_split': None,
  })  # fmt: skip
  results = train(final, str(workdir / 'final'))
  if 'preempted_at_step' in results:
    return results
  table = {
    'model': config.model_name,
    'dataset': config.dataset,
    'val_accuracy': {f'{lr:g}': acc for lr, acc in scores.items()},
    'best_lr': best,
    'test_accuracy': results['eval_accuracy'],
  }
  workdir_lib.write_json(workdir, 'results.json', table)
  workdir_lib.write_text(workdir, 'results.md', format_sweep(table))
  logging.info('\n%s', format_sweep(table))
  return table


def format_sweep(table: dict[str, Any]) -> str:
  lines = [
    f'# {table["model"]} on {table["dataset"]}',
    '',
    '| learning rate | val accuracy |',
    '|---|---|',
  ]
  for lr, accuracy in table['val_accuracy'].items():
    chosen = ' (chosen)' if float(lr) == table['best_lr'] else ''
    lines.append(f'| {lr}{chosen} | {100 * accuracy:.2f} |')
  lines += [
    '',
    f'Test accuracy at lr {table["best_lr"]:g}, trained on the whole '
    f'training set: **{100 * table["test_accuracy"]:.2f}**',
    '',
  ]
  return '\n'.join(lines)


def run(config: ml_collections.ConfigDict, workdir: str):
  # Once, so that every run of a sweep has the same length.
  config = steps_from_data(config)
  if config.sweep:
    return sweep(config, workdir)
  return train(config, workdir)

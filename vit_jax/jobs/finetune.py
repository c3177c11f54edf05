"""The fine-tuning job: a pretrained checkpoint transferred to a new task.

It runs on the same loop as pretraining (sharding, checkpoints, resume,
logging); what differs is the task: the model is rebuilt with the pretrained
architecture and the new classes and resolution, and its first state comes
from the adapted checkpoint (vit_jax/checkpoints/transfer.py).

With `config.sweep`, every learning rate of `config.lr_grid` trains on the
'train' split and is scored on the held-out 'val' split; the best one
retrains on 'train_full' and is scored on 'test' (the paper's protocol). The
results table goes to results.md and results.json in the workdir.
"""

import copy
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from vit_jax import checkpoints, data, loop, models, steps
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
    variables, description = checkpoints.read(config.init)
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


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """One fine-tuning run (exported as workdir/model.npz if export_npz)."""
  return loop.train_and_evaluate(config, workdir, make_task)


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
  if config.sweep:
    return sweep(config, workdir)
  return train(config, workdir)

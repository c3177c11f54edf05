"""VTAB-1k: one checkpoint fine-tuned on each of 19 tasks, one table.

Every task runs the fine-tuning recipe (configs/common.py: 2,500 steps at
learning rate 0.01, batch 512, 384 px) on its 1,000 training examples
(train800val200) and is scored on its test split. The table gives each
task's accuracy and the Natural, Specialized, Structured and overall means;
it is printed and written to results.md and results.json in the workdir.
Rerunning resumes: finished tasks are read back, not retrained.
"""

import copy

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vit_jax import loop
from vit_jax import workdir as workdir_lib
from vit_jax.data import presets
from vit_jax.jobs import finetune

GROUPS = presets.VTAB_GROUPS


def task_config(config: ml_collections.ConfigDict, task: str):
  """The fine-tuning config of one task."""
  if task not in presets.VTAB_TASKS:
    raise ValueError(
      f'Unknown VTAB task {task!r}; use some of {sorted(presets.VTAB_TASKS)}.'
    )
  run = copy.deepcopy(config)
  run.dataset = f'vtab/{task}'
  run.train_split = 'train_full'
  run.eval_split = 'test'
  run.test_split = None
  return run


def summarize(accuracies: dict[str, float]) -> dict[str, float]:
  """Group means over the tasks that ran, and the mean over all of them."""
  summary = {}
  for group, tasks in GROUPS.items():
    done = [accuracies[t] for t in tasks if t in accuracies]
    if done:
      summary[group] = float(np.mean(done))
  summary['mean'] = float(np.mean(list(accuracies.values())))
  return summary


def format_table(model: str, accuracies: dict[str, float]) -> str:
  summary = summarize(accuracies)
  lines = [
    f'# VTAB-1k, {model}',
    '',
    '| group | task | accuracy |',
    '|---|---|---|',
  ]
  for group, tasks in GROUPS.items():
    for task in tasks:
      if task in accuracies:
        lines.append(f'| {group} | {task} | {100 * accuracies[task]:.1f} |')
    if group in summary:
      lines.append(f'| **{group}** | mean | **{100 * summary[group]:.1f}** |')
  lines.append(f'| **all** | mean of {len(accuracies)} | '
               f'**{100 * summary["mean"]:.1f}** |')  # fmt: skip
  return '\n'.join(lines) + '\n'


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = epath.Path(workdir)
  finished = loop.finished_results(workdir)
  if finished is not None:
    logging.info('VTAB in %s has finished: nothing to do.', workdir)
    return finished
  tasks = list(config.vtab_tasks) or list(presets.VTAB_TASKS)
  accuracies = {}
  for task in tasks:
    results = finetune.train(task_config(config, task), str(workdir / task))
    if 'preempted_at_step' in results:
      return results
    accuracies[task] = results['eval_accuracy']
    logging.info('VTAB %s: %.2f%%', task, 100 * accuracies[task])
  table = format_table(config.model_name, accuracies)
  print(table)
  results = {'tasks': accuracies, **summarize(accuracies)}
  workdir_lib.write_text(workdir, 'results.md', table)
  workdir_lib.write_json(workdir, 'results.json', results)
  return results

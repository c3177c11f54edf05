"""The training loop that pretraining and fine-tuning share.

  1. mesh and data          4. resume from the workdir, or initialise
  2. model and optimizer    5. compile the train and eval steps
  3. state shardings        6. train: log, evaluate, checkpoint; stop cleanly
                               on SIGTERM, stop loudly on a NaN loss
  7. finish: export, then results.json (last: it marks the run finished)

A job differs only in its `Task` (vit_jax/objectives): the model, the
loss, and where the first state's variables come from (random
initialisation for pretraining, a transferred checkpoint for fine-tuning).
What is evaluated, and when, is the config's evaluators
(vit_jax/evaluators).

What a fault does (README, "Failures and recovery"): a killed run resumes
from its newest checkpoint that restores and redoes the steps after it, so
that its metrics and results equal an uninterrupted run's; a rerun of a
finished run changes nothing; only one run at a time holds a workdir.
"""

import json
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vit_jax import (
  checkpoints,
  config_checks,
  data,
  evaluators,
  metric_logging,
  run_guards,
  sharding,
  train_state,
  workdir_lock,
)
from vit_jax import training as training_lib
from vit_jax import (
  workdir as workdir_lib,
)
from vit_jax.objectives import Task

# The key of a run's results when SIGTERM stopped it early.
PREEMPTED = 'preempted_at_step'
RESULTS = 'results.json'
# Raised by the loop; defined with what checks for them.
NonFiniteLossError = run_guards.NonFiniteLossError
NonFiniteStateError = run_guards.NonFiniteStateError


def finished_results(
  workdir: str | epath.Path, config: ml_collections.ConfigDict | None = None
) -> dict[str, Any] | None:
  """The results of the finished run in `workdir`; None if there is none.

  results.json is written last, after the export, so it exists only once
  every part of the run is done. With `config`, only a run of that same
  config counts: another one (more steps, another model) goes on to resume
  or to be refused as usual.
  """
  workdir = epath.Path(workdir)
  if not (workdir / RESULTS).exists():
    return None
  if config is not None:
    recorded = workdir / workdir_lib.CONFIG
    if not recorded.exists() or json.loads(recorded.read_text()) != json.loads(
      config.to_json_best_effort()
    ):
      return None
  return json.loads((workdir / RESULTS).read_text())


def total_steps(config: ml_collections.ConfigDict, ds: data.Dataset) -> int:
  """`config.total_steps`, or `config.num_epochs` of the training split."""
  if config.total_steps is not None:
    return config.total_steps
  if config.num_epochs is None:
    raise ValueError('Set config.total_steps or config.num_epochs.')
  examples = config.num_train_examples or ds.num_examples(config.train_split)
  return max(1, round(config.num_epochs * examples / config.batch_size))


def _average(pending: list[tuple[int, dict]]) -> dict[str, float]:
  """Means over a logging window, in float64 whether its values were
  fetched from the devices or restored from a checkpoint."""
  keys = pending[-1][1].keys()
  return {
    k: float(np.mean(np.asarray([m[k] for _, m in pending], np.float64)))
    for k in keys
  }


def _initial_state(config, task, training, state_checkpoints):
  """The state to start from, and its unlogged training metrics.

  Resumes from the newest checkpoint in the workdir that restores, or
  creates the first state.
  """
  if state_checkpoints.latest_step() is not None:
    restored = state_checkpoints.restore_newest(
      training.layout, task.description
    )
    logging.info('Resumed from step %d.', restored.step)
    return restored.state, restored.log_window
  if task.initial_variables is not None:
    state = train_state.state_from_variables(
      task.initial_variables(), training.tx, training.use_ema, training.layout
    )
    return state, []
  return training.new_state(config.seed), []


def _prefixed(name: str, metrics: dict[str, Any]) -> dict[str, float]:
  """An evaluator's metrics as logged: '<name>_<metric>', counts left out."""
  return {
    f'{name}_{key}': value
    for key, value in metrics.items()
    if key not in ('examples', 'examples_scored')
  }


def _train(config, task, ds, state, log_window, train_step, evals,
           state_checkpoints, logger, num_steps):  # fmt: skip
  """Steps from `state.step` to `num_steps`; returns the final metrics.

  Logging windows end at multiples of `log_every`; `log_window` holds the
  metrics of the current window's steps done before a resume.

  Over 60 lines on purpose: the order of the per-step checks (log, NaN,
  evaluate, save, SIGTERM) is what makes a resume exact, and it reads best
  in one piece; the small closures share the state the loop advances.
  """
  use_ema = config.ema_decay > 0

  def evaluate(evaluator) -> dict[str, float]:
    return _prefixed(
      evaluator.name, evaluator.run(state.variables(ema=use_ema))
    )

  def final_results() -> dict[str, float]:
    results = {}
    for evaluator in evals:
      if evaluator.final:
        results.update(evaluate(evaluator))
    return results

  def save(step, pending):
    # Records up to a checkpoint's step are never redone after a resume.
    logger.flush()
    run_guards.save_if_finite(
      step, state, task.description, pending, state_checkpoints
    )

  step = start_step = int(state.step)
  logger.start(start_step)
  if start_step == num_steps:
    # The last checkpoint is saved after the final results were logged:
    # they are computed again for results.json, not logged twice.
    return final_results()
  batches = ds.train_iter(start_step, split=config.train_split)
  pending: list[tuple[int, dict]] = list(log_window)
  with run_guards.Preemption() as preemption:
    while step < num_steps:
      state, metrics = train_step(state, next(batches))
      step += 1
      pending.append((step, metrics))
      state_checkpoints.check_saves()  # A failed save stops the run now.
      log_due = step % config.log_every == 0 or step == num_steps
      checkpoint_due = step % config.checkpoint_every == 0
      evals_due = [e for e in evals if e.every and step % e.every == 0]
      if log_due or checkpoint_due or evals_due:
        # Fetching the metrics waits for the step; a NaN stops the run
        # before any state of its step is saved.
        pending = jax.device_get(pending)
        run_guards.check_finite(pending, state_checkpoints)
        if log_due:
          logger.progress(step, _average(pending))
          pending = []
      if step == num_steps:
        break
      for evaluator in evals_due:
        logger.log(step, evaluate(evaluator))
      if checkpoint_due:
        save(step, pending)
      if preemption.stop_requested(at_sync_point=log_due or checkpoint_due):
        if not checkpoint_due:
          pending = jax.device_get(pending)
          run_guards.check_finite(pending, state_checkpoints)
          save(step, pending)
        logging.warning(
          'Stopped at step %d by SIGTERM, with a checkpoint of that step; '
          'rerun the same command to resume.',
          step,
        )
        return {PREEMPTED: step}

  results = final_results()
  logger.log(num_steps, results)
  save(num_steps, [])
  return results


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  make_task: Callable[[ml_collections.ConfigDict, data.Dataset], Task],
) -> dict[str, float]:
  """Trains to `total_steps` (resuming from `workdir`) and evaluates.

  Args:
    config: the job config (configs/common.py lists the keys).
    workdir: everything is written here: config.json, checkpoints/,
      metrics.jsonl, TensorBoard events, results.json.
    make_task: builds the job's Task from the config and the dataset.

  Returns:
    The final metrics (also in workdir/results.json; read back from there
    if the run had finished before). If SIGTERM stopped the run early, they
    hold `PREEMPTED` (the step saved) instead.

  Raises:
    config_checks.ConfigError: a config value no run can use.
    workdir_lock.WorkdirLockedError: another run is using the workdir.
  """
  config_checks.validate(config)
  workdir = epath.Path(workdir)
  finished = finished_results(workdir, config)
  if finished is not None:
    logging.info(
      '%s holds a finished run of this config (%s): nothing to do. Use a new '
      '--workdir to train again.',
      workdir,
      workdir / RESULTS,
    )
    return finished
  with workdir_lock.locked(workdir):
    results = _run(config, workdir, make_task)
  return results


def _run(config, workdir: epath.Path, make_task) -> dict[str, float]:
  """`train_and_evaluate` in numbered sections, holding the workdir.

  One function, so that the whole run reads top to bottom; each section is
  a call.
  """
  # 1. Mesh and data.
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.model)
  sharding.rules_for(config.sharding)  # Validates the name early.
  ds = data.get_dataset(config, mesh)
  workdir_lib.record_split_files(workdir, config.dataset, ds.split_files())
  num_steps = total_steps(config, ds)
  task = make_task(config, ds)

  with sharding.activation_sharding(mesh, config.sharding):
    # 2.-3. Model, optimizer and state shardings.
    training = training_lib.build_training(
      config, task, mesh, num_steps, ds.steps_per_epoch
    )
    state_checkpoints = checkpoints.StateCheckpoints(
      workdir / 'checkpoints', keep=config.keep_checkpoints
    )
    logger = metric_logging.MetricLogger(
      str(workdir), num_steps, config.batch_size
    )
    try:
      # 4. Resume or initialise; the config is recorded once the workdir
      # has accepted it (same model).
      state, log_window = _initial_state(
        config, task, training, state_checkpoints
      )
      workdir_lib.write_config(workdir, config)
      # 5. Compile the train step; build the evaluators.
      compile_start = time.perf_counter()
      train_step = training.train_step.lower(
        training.layout.abstract,
        training_lib.abstract_batch(config, ds.num_classes, mesh),
      ).compile()
      logging.info(
        'Compiled the train step in %.1f s.',
        time.perf_counter() - compile_start,
      )
      context = evaluators.Context(
        task, mesh, config, datasets={config.dataset: ds}
      )
      evals = evaluators.from_config(evaluators.training_evals(config), context)
      # 6. Train.
      results = _train(
        config, task, ds, state, log_window, train_step, evals,
        state_checkpoints, logger, num_steps,
      )  # fmt: skip
    finally:
      # Whatever stops the run, pending saves of good steps complete.
      state_checkpoints.close()
      logger.close()
  # 7. Finish: results.json last, as the mark of a finished run.
  if PREEMPTED not in results:
    if config.export_npz:  # In the formats of config.export.
      checkpoints.export(
        workdir, workdir, config.get('export', 'npz'), ema=training.use_ema
      )
    workdir_lib.write_json(workdir, RESULTS, results)
  return results

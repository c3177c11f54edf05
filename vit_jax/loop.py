"""The training loop that pretraining and fine-tuning share.

  1. mesh and data          4. resume from the workdir, or initialise
  2. model and optimizer    5. compile the train and eval steps
  3. state shardings        6. train: log, evaluate, checkpoint; stop cleanly
                               on SIGTERM, stop loudly on a NaN loss

A job differs only in its `Task` (vit_jax/objectives): the model, the
loss, and where the first state's variables come from (random
initialisation for pretraining, a transferred checkpoint for fine-tuning).
What is evaluated, and when, is the config's evaluators
(vit_jax/evaluators).
"""

import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vit_jax import (
  checkpoints,
  data,
  evaluators,
  metric_logging,
  optim,
  sharding,
  steps,
  train_state,
)
from vit_jax import (
  workdir as workdir_lib,
)
from vit_jax.objectives import Task

PyTree = Any


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


def total_steps(config: ml_collections.ConfigDict, ds: data.Dataset) -> int:
  """`config.total_steps`, or `config.num_epochs` of the training split."""
  if config.total_steps is not None:
    return config.total_steps
  if config.num_epochs is None:
    raise ValueError('Set config.total_steps or config.num_epochs.')
  examples = config.num_train_examples or ds.num_examples(config.train_split)
  return max(1, round(config.num_epochs * examples / config.batch_size))


class _Preemption:
  """Turns SIGTERM into a request to save and stop at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint and stopping.')
    self.requested = True

  def stop_requested(self, at_sync_point: bool) -> bool:
    """Whether to stop now; all processes agree.

    One process checks its flag at every step; several processes combine
    their flags at sync points only (log and checkpoint steps), since that
    takes a collective.
    """
    if jax.process_count() == 1:
      return self.requested
    if not at_sync_point:
      return False
    flags = multihost_utils.process_allgather(np.array(self.requested))
    return bool(np.any(flags))

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(pending: list[tuple[int, dict]]) -> None:
  """Raises on the first step whose loss is not finite."""
  for step, metrics in pending:
    loss = float(metrics['train_loss'])
    if not np.isfinite(loss):
      raise NonFiniteLossError(
        f'The training loss is {loss} at step {step}. Stopped before saving '
        'any state of that step; the checkpoints in the workdir are the last '
        'good ones. Lower the learning rate (config.lr.base), enable '
        'clipping (config.optimizer.grad_clip_norm) or check the data.'
      )


def _average(pending: list[tuple[int, dict]]) -> dict[str, float]:
  keys = pending[-1][1].keys()
  return {k: float(np.mean([m[k] for _, m in pending])) for k in keys}


def _abstract_batch(
  config, ds: data.Dataset, mesh
) -> dict[str, jax.ShapeDtypeStruct]:
  batch_sharding = sharding.batch_sharding(mesh)
  size, batch = config.image_size, config.batch_size
  classes = ds.num_classes
  return {
    'images': jax.ShapeDtypeStruct(
      (batch, size, size, 3), np.float32, sharding=batch_sharding
    ),
    'labels': jax.ShapeDtypeStruct(
      (batch, classes), np.float32, sharding=batch_sharding
    ),
  }


@dataclasses.dataclass
class Training:
  """The optimizer, state layout and train step of a task on a mesh.

  Attributes:
    schedule: the learning rate per step.
    tx: the optimizer.
    layout: the training state's shapes and shardings.
    train_step: the jitted `(state, batch) -> (state, metrics)`, not yet
      compiled.
    init_variables: rng -> the model's freshly initialised variables.
    use_ema: whether the state carries Polyak-averaged parameters.
  """

  schedule: optax.Schedule
  tx: optax.GradientTransformation
  layout: train_state.StateLayout
  train_step: Callable
  init_variables: Callable[[jax.Array], PyTree]
  use_ema: bool

  def new_state(self, seed: int) -> train_state.TrainState:
    """A randomly initialised state, placed as `layout` says."""
    return train_state.create_state(
      self.init_variables, self.tx, self.use_ema, self.layout,
      jax.random.key(seed),
    )  # fmt: skip


def build_training(
  config: ml_collections.ConfigDict,
  task: Task,
  mesh,
  num_steps: int,
  steps_per_epoch: int | None = None,
) -> Training:
  """Steps 2-3 and 5 of the loop, shared with the benchmark job.

  Call it inside `sharding.activation_sharding(mesh, config.sharding)`.
  """
  schedule = optim.learning_rate_schedule(config.lr, num_steps, steps_per_epoch)
  tx = optim.make_optimizer(config.optimizer, schedule)
  use_ema = config.ema_decay > 0

  def init_variables(rng):
    images = jax.numpy.zeros((1, config.image_size, config.image_size, 3))
    return task.model.init(rng, images)

  layout = train_state.state_layout(
    init_variables, tx, use_ema, mesh, config.sharding
  )
  train_step = steps.make_train_step_from_config(
    config,
    task.model,
    tx,
    task.loss_fn,
    schedule,
    mesh=mesh,
    layout=layout,
    target=task.target,
    rng_streams=task.rng_streams,
  )
  return Training(schedule, tx, layout, train_step, init_variables, use_ema)


def _initial_state(config, task, training, state_checkpoints):
  """Resumes from the workdir's checkpoints, or creates the first state."""
  if state_checkpoints.latest_step() is not None:
    state_checkpoints.check_model(task.description)
    state = state_checkpoints.restore(training.layout)
    logging.info('Resumed from step %d.', int(state.step))
    return state
  if task.initial_variables is not None:
    return train_state.state_from_variables(
      task.initial_variables(), training.tx, training.use_ema, training.layout
    )
  return training.new_state(config.seed)


def _prefixed(name: str, metrics: dict[str, Any]) -> dict[str, float]:
  """An evaluator's metrics as logged: '<name>_<metric>', counts left out."""
  return {
    f'{name}_{key}': value
    for key, value in metrics.items()
    if key not in ('examples', 'examples_scored')
  }


def _train(config, task, ds, state, train_step, evals, state_checkpoints,
           logger, num_steps):  # fmt: skip
  """Steps from `state.step` to `num_steps`; returns the final metrics."""
  use_ema = config.ema_decay > 0

  def evaluate(evaluator) -> dict[str, float]:
    return _prefixed(
      evaluator.name, evaluator.run(state.variables(ema=use_ema))
    )

  step = start_step = int(state.step)
  batches = ds.train_iter(start_step, split=config.train_split)
  pending: list[tuple[int, dict]] = []
  logger.start(start_step)
  with _Preemption() as preemption:
    while step < num_steps:
      state, metrics = train_step(state, next(batches))
      step += 1
      pending.append((step, metrics))
      log_due = step % config.log_every == 0 or step == num_steps
      checkpoint_due = step % config.checkpoint_every == 0
      evals_due = [e for e in evals if e.every and step % e.every == 0]
      if log_due or checkpoint_due or evals_due:
        # Fetching the metrics waits for the step; a NaN stops the run
        # before any state of its step is saved.
        pending = jax.device_get(pending)
        _check_finite(pending)
        if log_due:
          logger.progress(step, _average(pending))
        pending = []
      if step == num_steps:
        break
      for evaluator in evals_due:
        logger.log(step, evaluate(evaluator))
      if checkpoint_due:
        state_checkpoints.save(step, state, task.description)
      if preemption.stop_requested(at_sync_point=log_due or checkpoint_due):
        _check_finite(jax.device_get(pending))
        state_checkpoints.save(step, state, task.description, force=True)
        logging.warning('Stopped at step %d; rerun to resume.', step)
        return {'preempted_at_step': step}

  results = {}
  for evaluator in evals:
    if evaluator.final:
      results.update(evaluate(evaluator))
  logger.log(num_steps, results)
  if state_checkpoints.latest_step() != num_steps:
    state_checkpoints.save(num_steps, state, task.description, force=True)
  return results


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  make_task: Callable[[ml_collections.ConfigDict, data.Dataset], Task],
) -> dict[str, float]:
  """Trains to `total_steps` (resuming from `workdir`) and evaluates.

  One function in numbered sections, so that the whole run reads top to
  bottom; each section is a call.

  Args:
    config: the job config (configs/common.py lists the keys).
    workdir: everything is written here: config.json, checkpoints/,
      metrics.jsonl, TensorBoard events, results.json.
    make_task: builds the job's Task from the config and the dataset.

  Returns:
    The final metrics (also in workdir/results.json). If SIGTERM stopped the
    run early, they hold 'preempted_at_step' instead.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_config(workdir, config)

  # 1. Mesh and data.
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.model)
  sharding.rules_for(config.sharding)  # Validates the name early.
  ds = data.get_dataset(config, mesh)
  workdir_lib.record_split_files(workdir, config.dataset, ds.split_files())
  num_steps = total_steps(config, ds)
  task = make_task(config, ds)

  with sharding.activation_sharding(mesh, config.sharding):
    # 2.-3. Model, optimizer and state shardings.
    training = build_training(config, task, mesh, num_steps, ds.steps_per_epoch)
    state_checkpoints = checkpoints.StateCheckpoints(
      workdir / 'checkpoints', keep=config.keep_checkpoints
    )
    logger = metric_logging.MetricLogger(
      str(workdir), num_steps, config.batch_size
    )
    try:
      # 4. Resume or initialise.
      state = _initial_state(config, task, training, state_checkpoints)
      # 5. Compile the train step; build the evaluators.
      compile_start = time.perf_counter()
      train_step = training.train_step.lower(
        training.layout.abstract, _abstract_batch(config, ds, mesh)
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
        config, task, ds, state, train_step, evals, state_checkpoints,
        logger, num_steps,
      )  # fmt: skip
    finally:
      # Whatever stops the run, pending saves of good steps complete.
      state_checkpoints.close()
      logger.close()
  if 'preempted_at_step' not in results:
    workdir_lib.write_json(workdir, 'results.json', results)
    if config.export_npz:  # In the formats of config.export.
      checkpoints.export(
        workdir, workdir, config.get('export', 'npz'), ema=training.use_ema
      )
  return results

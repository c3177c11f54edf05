"""The training loop that pretraining and fine-tuning share.

  1. mesh and data          4. resume from the workdir, or initialise
  2. model and optimizer    5. compile the train and eval steps
  3. state shardings        6. train: log, evaluate, checkpoint; stop cleanly
                               on SIGTERM, stop loudly on a NaN loss

A job differs only in its `Task`: the model, the loss, and where the first
state's variables come from (random initialisation for pretraining, a
transformed checkpoint for fine-tuning).
"""

import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vit_jax import (
  data,
  export,
  metric_logging,
  models,
  optim,
  sharding,
  steps,
  train_checkpoints,
  train_state,
)
from vit_jax.models import get_model

PyTree = Any


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


@dataclasses.dataclass
class Task:
  """What a job plugs into the loop.

  Attributes:
    model: the Flax module trained.
    loss_fn: per-example loss of (model outputs, targets).
    description: JSON-able model description saved with every checkpoint;
      a workdir is only resumed by a task with the same description.
    initial_variables: returns host variables for the first state (e.g. a
      pretrained checkpoint adapted to `model`); None for a random init.
    extra_eval: an evaluation run every `extra_eval_every` steps on the
      state (e.g. few-shot linear probes), returning metrics to log.
    extra_eval_every: its period in steps; 0 disables it.
    target: the batch entry the outputs are compared with: 'labels', or
      'images' for a self-supervised objective.
    rng_streams: RNG streams the model draws from besides 'dropout' (keys
      derived from the seed and step in training, from the seed in
      evaluation).
    eval_metrics: what evaluation reports; top-1 accuracy and mean loss
      (`steps.classification_metrics`) by default.
  """

  model: nn.Module
  loss_fn: steps.LossFn
  description: dict[str, Any]
  initial_variables: Callable[[], PyTree] | None = None
  extra_eval: Callable[[train_state.TrainState], dict[str, float]] | None = None
  extra_eval_every: int = 0
  target: str = 'labels'
  rng_streams: tuple[str, ...] = ()
  eval_metrics: steps.EvalMetrics | None = None

  def __post_init__(self):
    if self.eval_metrics is None:
      self.eval_metrics = steps.classification_metrics(self.loss_fn)


def model_from_config(
  config: ml_collections.ConfigDict, num_classes: int
) -> tuple[nn.Module, dict[str, Any]]:
  """The model a config names, and its JSON description."""
  overrides = models.config_overrides(config.model)
  model = get_model(config.model_name, num_classes, **overrides)
  description = {
    'model_name': config.model_name,
    'num_classes': num_classes,
    'image_size': config.image_size,
    'overrides': overrides,
  }
  return model, description


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


def write_config(config: ml_collections.ConfigDict, workdir: epath.Path):
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))


def _initial_state(config, task, tx, layout, checkpoints, init_variables):
  """Resumes from the workdir's checkpoints, or creates the first state."""
  use_ema = config.ema_decay > 0
  if checkpoints.latest_step() is not None:
    checkpoints.check_model(task.description)
    state = checkpoints.restore(layout)
    logging.info('Resumed from step %d.', int(state.step))
    return state
  if task.initial_variables is not None:
    return train_state.state_from_variables(
      task.initial_variables(), tx, use_ema, layout
    )
  return train_state.create_state(
    init_variables, tx, use_ema, layout, jax.random.key(config.seed)
  )


def _train(config, task, ds, state, train_step, eval_step, checkpoints, logger,
           num_steps):  # fmt: skip
  """Steps from `state.step` to `num_steps`; returns the final metrics."""
  use_ema = config.ema_decay > 0

  def evaluate(split: str, prefix: str) -> dict[str, float]:
    variables = state.variables(ema=use_ema)
    metrics = steps.evaluate(
      eval_step, variables, ds.eval_iter(split), task.eval_metrics.summarize
    )
    return {
      f'{prefix}_{name}': value
      for name, value in metrics.items()
      if name != 'examples'
    }

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
      eval_due = bool(config.eval_every) and step % config.eval_every == 0
      extra_due = bool(task.extra_eval_every) and (
        step % task.extra_eval_every == 0
      )
      if log_due or checkpoint_due or eval_due or extra_due:
        # Fetching the metrics waits for the step; a NaN stops the run
        # before any state of its step is saved.
        pending = jax.device_get(pending)
        _check_finite(pending)
        if log_due:
          logger.progress(step, _average(pending))
        pending = []
      if step == num_steps:
        break
      if eval_due:
        logger.log(step, evaluate(config.eval_split, 'eval'))
      if extra_due:
        logger.log(step, task.extra_eval(state))
      if checkpoint_due:
        checkpoints.save(step, state, task.description)
      if preemption.stop_requested(at_sync_point=log_due or checkpoint_due):
        _check_finite(jax.device_get(pending))
        checkpoints.save(step, state, task.description, force=True)
        logging.warning('Stopped at step %d; rerun to resume.', step)
        return {'preempted_at_step': step}

  results = evaluate(config.eval_split, 'eval')
  if config.test_split:
    results.update(evaluate(config.test_split, config.test_split))
  logger.log(num_steps, results)
  if checkpoints.latest_step() != num_steps:
    checkpoints.save(num_steps, state, task.description, force=True)
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
    The final metrics (also in workdir/results.json). If SIGTERM stopped the
    run early, they hold 'preempted_at_step' instead.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  write_config(config, workdir)

  # 1. Mesh and data.
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.model)
  sharding.rules_for(config.sharding)  # Validates the name early.
  ds = data.get_dataset(config, mesh)
  num_steps = total_steps(config, ds)

  # 2. Model and optimizer.
  task = make_task(config, ds)
  schedule = optim.learning_rate_schedule(
    config.lr, num_steps, ds.steps_per_epoch
  )
  tx = optim.make_optimizer(config.optimizer, schedule)
  use_ema = config.ema_decay > 0

  def init_variables(rng):
    images = jax.numpy.zeros((1, config.image_size, config.image_size, 3))
    return task.model.init(rng, images)

  with sharding.activation_sharding(mesh, config.sharding):
    # 3. State shardings.
    layout = train_state.state_layout(
      init_variables, tx, use_ema, mesh, config.sharding
    )
    checkpoints = train_checkpoints.Checkpoints(
      workdir / 'checkpoints', keep=config.keep_checkpoints
    )
    logger = metric_logging.MetricLogger(
      str(workdir), num_steps, config.batch_size
    )
    try:
      # 4. Resume or initialise.
      state = _initial_state(
        config, task, tx, layout, checkpoints, init_variables
      )
      # 5. Compile.
      compile_start = time.perf_counter()
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
      train_step = train_step.lower(
        layout.abstract, _abstract_batch(config, ds, mesh)
      ).compile()
      logging.info(
        'Compiled the train step in %.1f s.',
        time.perf_counter() - compile_start,
      )
      eval_step = steps.make_eval_step(
        task.model,
        task.loss_fn,
        mesh,
        metrics=task.eval_metrics,
        target=task.target,
        rng_streams=task.rng_streams,
        seed=config.seed,
      )
      # 6. Train.
      results = _train(
        config, task, ds, state, train_step, eval_step, checkpoints, logger,
        num_steps,
      )  # fmt: skip
    finally:
      # Whatever stops the run, pending saves of good steps complete.
      checkpoints.close()
      logger.close()
  if 'preempted_at_step' not in results:
    if jax.process_index() == 0:
      (workdir / 'results.json').write_text(json.dumps(results, indent=2))
    if config.export_npz:
      export.export_npz(str(workdir), ema=use_ema)
  return results

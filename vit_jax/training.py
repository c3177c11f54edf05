"""The optimizer, state layout and training step of a task on a mesh.

What the training loop (vit_jax/loop.py) and the benchmark job share. It
needs no input pipeline, so it loads where TensorFlow is not installed.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from vit_jax import optim, sharding, steps, train_state
from vit_jax.objectives.task import Task

PyTree = Any


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
  """Steps 2-3 and 5 of the training loop (vit_jax/loop.py).

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


def abstract_batch(
  config: ml_collections.ConfigDict, num_classes: int, mesh
) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and shardings of a global batch, to compile the step for."""
  batch_sharding = sharding.batch_sharding(mesh)
  size, batch = config.image_size, config.batch_size
  return {
    'images': jax.ShapeDtypeStruct(
      (batch, size, size, 3), np.float32, sharding=batch_sharding
    ),
    'labels': jax.ShapeDtypeStruct(
      (batch, num_classes), np.float32, sharding=batch_sharding
    ),
  }

"""What stops a training run: SIGTERM, and values that are not finite.

SIGTERM (a preemption) stops the run cleanly at the next step, with a
checkpoint of that step. A loss or state that is not finite stops it loudly,
and leaves only good checkpoints: ones with finite parameters whose own loss
(the loss of the step after them) was finite.
"""

import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

PyTree = Any
# Checkpoints whose parameters gave a non-finite loss are moved aside so.
DIVERGED = 'diverged'


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class NonFiniteStateError(FloatingPointError):
  """The parameters or optimizer state became NaN or infinite."""


class Preemption:
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


def _good_checkpoint_note(state_checkpoints) -> str:
  good = state_checkpoints.latest_step()
  if good is None:
    return 'no checkpoint is left: a rerun starts from step 0'
  return (
    f'the last good checkpoint is step {good} (finite parameters, and a '
    'finite loss at the step after it): a rerun resumes from it'
  )


def check_finite(pending: list[tuple[int, dict]], state_checkpoints) -> None:
  """Raises on the first step whose loss is not finite.

  The loss of step t is that of the parameters after step t - 1: if they
  were saved, that checkpoint would fail again at once on resuming, so it is
  moved aside (not deleted).
  """
  for step, metrics in pending:
    loss = float(metrics['train_loss'])
    if np.isfinite(loss):
      continue
    state_checkpoints.wait()
    moved = ''
    if state_checkpoints.latest_step() == step - 1:
      path = state_checkpoints.move_aside(step - 1, DIVERGED)
      moved = (
        f'Checkpoint {step - 1}, whose parameters gave it, is now {path}. '
      )
    raise NonFiniteLossError(
      f'The training loss is {loss} at step {step}. {moved}Stopped before '
      f'saving any state of that step; {_good_checkpoint_note(state_checkpoints)}'
      '. Lower the learning rate (config.lr.base), enable clipping '
      '(config.optimizer.grad_clip_norm) or check the data.'
    )


@jax.jit
def _all_finite(tree: PyTree) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(leaf))
    for leaf in jax.tree.leaves(tree)
    if jnp.issubdtype(leaf.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves))


def save_if_finite(
  step, state, description, log_window, state_checkpoints
) -> None:
  """Saves a step whose loss so far was finite, if its state is finite too."""
  if not bool(_all_finite(state)):
    state_checkpoints.wait()
    raise NonFiniteStateError(
      f'The parameters or optimizer state after step {step} are not finite '
      f'(the loss was finite up to step {step}); step {step} was not saved '
      f'and {_good_checkpoint_note(state_checkpoints)}. Lower the learning '
      'rate (config.lr.base) or enable clipping '
      '(config.optimizer.grad_clip_norm).'
    )
  state_checkpoints.save(step, state, description, log_window)

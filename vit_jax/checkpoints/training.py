"""Orbax checkpoints of the training state (see `export` for writing weights).

Saves are asynchronous, every `checkpoint_every` steps, keeping the last
`keep` ones. Orbax writes a step into a temporary directory and renames it
when complete, so a process that dies mid-save leaves the previous
checkpoints as they were; an unfinished directory is ignored on restart.
Beside the state each step stores a small JSON description of the model, so
that a workdir is never resumed with another model and so that other jobs
(fine-tuning, evaluation) can rebuild the model from the checkpoint alone,
and the training metrics of its steps not yet logged, so that the first
logging window of a resumed run averages the same steps as an uninterrupted
run's.

Faults: a step that does not restore (truncated or missing files) is moved
aside as `<step>.corrupt` and the next older one is restored, provided one
does; a failed asynchronous save (a full disk) is reported as soon as it
fails, naming the path and the free space.
"""

import dataclasses
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vit_jax.checkpoints import faults
from vit_jax.models.description import ModelDescription
from vit_jax.train_state import StateLayout, TrainState

STATE = 'state'
MODEL = 'model'
LOG_WINDOW = 'log_window'
CORRUPT = 'corrupt'

# Per-step training metrics not yet logged: [(step, {name: value})].
LogWindow = list[tuple[int, dict[str, float]]]


class WorkdirMismatchError(ValueError):
  """The workdir holds checkpoints of a different model."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """A restored training state, its step and its unlogged metrics."""

  state: TrainState
  step: int
  log_window: LogWindow


class StateCheckpoints:
  """The checkpoints of one job, under `directory`."""

  def __init__(
    self, directory: str | epath.Path, keep: int = 3, read_only: bool = False
  ):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=True,
    )
    if read_only:
      # Readers inspect the state's metadata before restoring parts of it,
      # so its handler must be known up front.
      self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
          STATE: ocp.PyTreeCheckpointHandler(),
          MODEL: ocp.JsonCheckpointHandler(),
          LOG_WINDOW: ocp.JsonCheckpointHandler(),
        },
      )
    else:
      self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_names=(STATE, MODEL, LOG_WINDOW),
      )
    self._saving_step: int | None = None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def model_description(self, step: int | None = None) -> ModelDescription:
    """The model description saved with a step (the latest by default)."""
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(
      step, args=ocp.args.Composite(**{MODEL: ocp.args.JsonRestore()})
    )
    return ModelDescription.from_json(
      restored[MODEL], source=f'{self.directory}/{step}/{MODEL}'
    )

  def check_model(
    self, description: ModelDescription, step: int | None = None
  ) -> None:
    """Raises if a step (the latest by default) is of another model."""
    step = self.latest_step() if step is None else step
    self._check_same_model(self.model_description(step), description, step)

  def _check_same_model(
    self, saved: ModelDescription, description: ModelDescription, step: int
  ) -> None:
    saved = saved.to_json()
    new = description.to_json()
    if 'class_names' not in saved:
      # Written before class names were saved, or without them: nothing to
      # compare (the number of classes still is).
      new.pop('class_names', None)
    different = {
      key: (saved.get(key), value)
      for key, value in new.items()
      if saved.get(key) != value
    }
    if different:
      details = ', '.join(
        f'{key}: checkpoint {old!r}, config {wanted!r}'
        for key, (old, wanted) in different.items()
      )
      raise WorkdirMismatchError(
        f'{self.directory} holds checkpoints of another model ({details}) at '
        f'step {step}. Use a new --workdir, or delete '
        f'{self.directory} to start this model from scratch.'
      )

  def restore(self, layout: StateLayout, step: int | None = None) -> Restored:
    """Restores a state straight into the shardings of `layout`."""
    step = self.latest_step() if step is None else step
    items = {STATE: ocp.args.StandardRestore(layout.abstract)}
    # Checkpoints written before the log window was saved have none.
    has_window = (self.directory / str(step) / LOG_WINDOW).exists()
    if has_window:
      items[LOG_WINDOW] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    window = restored[LOG_WINDOW]['steps'] if has_window else []
    return Restored(
      state=restored[STATE],
      step=step,
      log_window=[(int(s), metrics) for s, metrics in window],
    )

  def restore_newest(
    self, layout: StateLayout, description: ModelDescription
  ) -> Restored:
    """Restores the newest step that restores, moving newer ones aside.

    A step whose files are damaged is moved to `<step>.corrupt` (never
    deleted) once an older step has restored: that proves the damage is the
    step's, not a config that fits none of them.

    Raises:
      WorkdirMismatchError: the checkpoints are of another model.
      CheckpointRestoreError: no step restores; nothing was moved.
    """
    faults.drop_echoes_of_a_failed_read()
    failures = []
    for step in reversed(self.all_steps()):
      try:
        saved = self.model_description(step)
      except Exception as e:  # Whatever fails, the step does not restore.
        failures.append((step, e))
        continue
      self._check_same_model(saved, description, step)
      try:
        restored = self.restore(layout, step)
      except Exception as e:  # Whatever fails, the step does not restore.
        failures.append((step, e))
        continue
      for bad_step, error in failures:
        moved = self.move_aside(bad_step, CORRUPT)
        logging.warning(
          'Checkpoint step %d does not restore (%s: %s); moved it to %s and '
          'resumed from step %d instead.',
          bad_step, type(error).__name__, error, moved, step,
        )  # fmt: skip
      return restored
    causes = '\n'.join(
      f'  step {step}: {type(e).__name__}: {e}' for step, e in failures
    )
    raise faults.CheckpointRestoreError(
      f'No checkpoint step in {self.directory} restores:\n{causes}\n'
      'If every step fails alike, the config differs from the one that '
      'wrote them (e.g. the optimizer): rerun with that config, or use a new '
      '--workdir. Nothing was moved or deleted.'
    )

  def move_aside(self, step: int, reason: str) -> epath.Path:
    """Renames a step to `<step>.<reason>`, out of orbax's sight."""
    target = self.directory / f'{step}.{reason}'
    suffix = 1
    while target.exists():
      target = self.directory / f'{step}.{reason}.{suffix}'
      suffix += 1
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'move_aside_{step}')
    self._manager.reload()
    return target

  def save(
    self,
    step: int,
    state: TrainState,
    description: ModelDescription,
    log_window: LogWindow = (),
  ) -> None:
    """Starts an asynchronous save of a step.

    Raises:
      CheckpointSaveError: this save, or the previous one, failed.
    """
    self.wait()  # Reports a failed previous save as that step's failure.
    self._saving_step = step
    items = {
      STATE: ocp.args.StandardSave(state),
      MODEL: ocp.args.JsonSave(description.to_json()),
      LOG_WINDOW: ocp.args.JsonSave(
        {
          'steps': [
            [int(s), {k: float(v) for k, v in metrics.items()}]
            for s, metrics in log_window
          ]
        }
      ),
    }
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except OSError as e:
      raise faults.CheckpointSaveError(self._save_failure(e)) from e

  def check_saves(self) -> None:
    """Raises CheckpointSaveError if the last save has failed.

    Cheap, and does not wait for a save in progress: call it every step.
    """
    if not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in progress; raises CheckpointSaveError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # Whatever fails, the step is lost.
      raise faults.CheckpointSaveError(self._save_failure(e)) from e

  def _save_failure(self, error: Exception) -> str:
    step = self._saving_step
    latest = self.latest_step()
    resume = (
      f'training resumes from step {latest}'
      if latest is not None
      else 'training starts again from step 0'
    )
    return (
      f'Saving the checkpoint of step {step} to {self.directory / str(step)} '
      f'failed ({type(error).__name__}: {error}); '
      f'{faults.free_space(self.directory)} on that disk. Free space (or lower '
      f'config.keep_checkpoints) and rerun: {resume}.'
    )

  def restore_variables(
    self, step: int | None = None, ema: bool = False
  ) -> dict[str, Any]:
    """Reads only the model variables of a step, as host numpy arrays.

    The optimizer state is not read, so this works on any number of devices.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    tree = self._manager.item_metadata(step)[STATE].tree
    params_key = 'ema_params' if ema else 'params'
    if ema and not tree.get('ema_params'):
      raise ValueError(
        f'The checkpoint in {self.directory} (step {step}) has no EMA '
        'parameters; train with config.ema_decay > 0 to save them.'
      )
    wanted = {params_key: tree[params_key]}
    if tree.get('batch_stats'):
      wanted['batch_stats'] = tree['batch_stats']
    restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted
    )
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        **{
          STATE: ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True
          )
        }
      ),
    )[STATE]
    variables = {'params': restored[params_key]}
    if 'batch_stats' in restored:
      variables['batch_stats'] = restored['batch_stats']
    return variables

  def close(self) -> None:
    """Waits for the save in progress (raising if it failed), then closes."""
    try:
      self.wait()
    finally:
      self._manager.close()


def checkpoint_directory(path: str | epath.Path) -> epath.Path | None:
  """The checkpoint directory of a workdir or of itself; None if neither.

  Orbax needs absolute paths, so a relative one is resolved here.
  """
  path = epath.Path(path)
  if not path.is_dir():
    return None
  if (path / 'checkpoints').is_dir():
    path = path / 'checkpoints'
  if not any(child.name.isdigit() for child in path.iterdir()):
    return None
  return path if str(path).startswith(('gs://', 's3://')) else path.resolve()


def load_variables(
  path: str | epath.Path, step: int | None = None, ema: bool = False
) -> tuple[dict[str, Any], ModelDescription]:
  """Model variables and description from a checkpoint directory.

  Args:
    path: a checkpoint directory, or a workdir holding `checkpoints/`.
    step: the step to read (default: the latest).
    ema: read the Polyak-averaged parameters instead (if saved).

  Returns:
    (variables as numpy arrays, the model description saved with them).
  """
  directory = checkpoint_directory(path)
  if directory is None:
    raise FileNotFoundError(
      f'No checkpoint directory at {path} (a workdir with checkpoints/, or '
      'a directory of numbered steps).'
    )
  checkpoints = StateCheckpoints(directory, read_only=True)
  faults.drop_echoes_of_a_failed_read()
  try:
    step = checkpoints.latest_step() if step is None else step
    try:
      variables = checkpoints.restore_variables(step, ema)
      return variables, checkpoints.model_description(step)
    except (OSError, ValueError, KeyError, AttributeError) as e:
      raise faults.CheckpointRestoreError(
        f'Step {step} of {directory} does not restore '
        f'({type(e).__name__}: {e}). Rerunning training in its workdir moves '
        'it aside and resumes from an older step; or read an older step.'
      ) from e
  finally:
    checkpoints.close()

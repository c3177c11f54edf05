"""Orbax checkpoints of the training state (see `export` for writing weights).

Saves are asynchronous, every `checkpoint_every` steps, keeping the last
`keep` ones. Orbax writes a step into a temporary directory and renames it
when complete, so a process that dies mid-save leaves the previous
checkpoints as they were; an unfinished directory is ignored on restart.
Beside the state each step stores a small JSON description of the model, so
that a workdir is never resumed with another model and so that other jobs
(fine-tuning, evaluation) can rebuild the model from the checkpoint alone.
"""

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vit_jax.models.description import ModelDescription
from vit_jax.train_state import StateLayout, TrainState

STATE = 'state'
MODEL = 'model'


class WorkdirMismatchError(ValueError):
  """The workdir holds checkpoints of a different model."""


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
        },
      )
    else:
      self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE, MODEL)
      )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def model_description(self, step: int | None = None) -> ModelDescription:
    """The model description saved with a step (the latest by default)."""
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(
      step, args=ocp.args.Composite(**{MODEL: ocp.args.JsonRestore()})
    )
    return ModelDescription.from_json(
      restored[MODEL], source=f'{self.directory}/{step}/{MODEL}'
    )

  def check_model(self, description: ModelDescription) -> None:
    """Raises if the latest checkpoint belongs to another model."""
    saved = self.model_description().to_json()
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
        f'{key}: checkpoint {old!r}, config {new!r}'
        for key, (old, new) in different.items()
      )
      raise WorkdirMismatchError(
        f'{self.directory} holds checkpoints of another model ({details}) at '
        f'step {self.latest_step()}. Use a new --workdir, or delete '
        f'{self.directory} to start this model from scratch.'
      )

  def restore(self, layout: StateLayout, step: int | None = None) -> TrainState:
    """Restores a state straight into the shardings of `layout`."""
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(layout.abstract)}
      ),
    )
    return restored[STATE]

  def save(
    self,
    step: int,
    state: TrainState,
    description: ModelDescription,
    force: bool = False,
  ) -> bool:
    """Starts an asynchronous save; returns whether one was started."""
    return self._manager.save(
      step,
      args=ocp.args.Composite(
        **{
          STATE: ocp.args.StandardSave(state),
          MODEL: ocp.args.JsonSave(description.to_json()),
        }
      ),
      force=force,
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
    self._manager.wait_until_finished()
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
  try:
    step = checkpoints.latest_step() if step is None else step
    variables = checkpoints.restore_variables(step, ema)
    return variables, checkpoints.model_description(step)
  finally:
    checkpoints.close()

"""Every weight file this project reads or writes, in one package.

- `load(source)`: any checkpoint (a workdir, an orbax directory, a
  published, AugReg, big_vision or exported .npz, a timm or transformers
  .safetensors or hub snapshot, or a published name such as
  `augreg:<file>`) as (model, variables, description); `read(source)`
  gives the raw variables and description.
- `save(path, variables, description, format)`: npz (published layout) or
  safetensors (timm's layout and config.json); `export` writes a training
  checkpoint in the formats asked for.
- `transfer`: checkpoint surgery (new head, resized position embeddings,
  pretraining-only parameters dropped) onto a model's shapes.
- `npz`: the published .npz layout; `training`: the orbax training state
  and its export; `tree`: block layouts and fitting shared by all.
"""

from vit_jax.checkpoints.export import FORMATS, export, export_npz, save
from vit_jax.checkpoints.faults import (
  CheckpointRestoreError,
  CheckpointSaveError,
)
from vit_jax.checkpoints.loader import (
  LAYOUTS,
  Layout,
  Loaded,
  UnknownLayoutError,
  load,
  read,
)
from vit_jax.checkpoints.npz import load_npz, load_npz_variables, save_npz
from vit_jax.checkpoints.published import WeightsUnavailableError
from vit_jax.checkpoints.safetensors_file import PickleRefusedError
from vit_jax.checkpoints.training import (
  StateCheckpoints,
  WorkdirMismatchError,
)
from vit_jax.checkpoints.transfer import resize_posemb, transfer
from vit_jax.checkpoints.tree import (
  CheckpointMismatchError,
  fit_to_model,
  flatten,
  unflatten,
)
from vit_jax.models.description import ModelDescription

__all__ = [
  'FORMATS',
  'LAYOUTS',
  'CheckpointMismatchError',
  'CheckpointRestoreError',
  'CheckpointSaveError',
  'Layout',
  'Loaded',
  'ModelDescription',
  'PickleRefusedError',
  'StateCheckpoints',
  'UnknownLayoutError',
  'WeightsUnavailableError',
  'WorkdirMismatchError',
  'export',
  'export_npz',
  'fit_to_model',
  'flatten',
  'load',
  'load_npz',
  'load_npz_variables',
  'read',
  'resize_posemb',
  'save',
  'save_npz',
  'transfer',
  'unflatten',
]

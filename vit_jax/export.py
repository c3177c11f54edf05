"""Exports a training checkpoint as a published-layout .npz.

  python main.py --config=configs/export.py --config.init=WORKDIR --workdir=OUT

writes OUT/model.npz (and OUT/model.json, the model description this
project reads back). Other tools (timm, the original code) load the .npz.
"""

import jax
import ml_collections
from etils import epath

from vit_jax import checkpoints, train_checkpoints


def export_npz(
  checkpoint: str, path: str | None = None, ema: bool = False
) -> epath.Path:
  """Writes a checkpoint's (EMA) variables as `path` (default model.npz).

  Args:
    checkpoint: a workdir with checkpoints/, or a checkpoint directory.
    path: the .npz to write; default: model.npz in the workdir.
    ema: export the Polyak-averaged weights.
  """
  variables, description = train_checkpoints.load_variables(checkpoint, ema=ema)
  path = epath.Path(path or epath.Path(checkpoint) / 'model.npz')
  if jax.process_index() == 0:
    checkpoints.save_npz(
      path,
      variables['params'],
      variables.get('batch_stats'),
      description=description,
    )
  return path


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  if not config.init:
    raise ValueError('Set --config.init to the workdir to export.')
  path = export_npz(
    config.init, str(epath.Path(workdir) / 'model.npz'), ema=config.ema
  )
  print(f'Wrote {path}')

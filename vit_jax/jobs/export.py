"""Exports a training checkpoint as a published-layout .npz.

  python main.py --config=configs/export.py --config.init=WORKDIR --workdir=OUT

writes OUT/model.npz (and OUT/model.json, the model description this
project reads back). Other tools (timm, the original code) load the .npz.
"""

import ml_collections
from etils import epath

from vit_jax import checkpoints


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  if not config.init:
    raise ValueError('Set --config.init to the workdir to export.')
  path = checkpoints.export_npz(
    config.init, epath.Path(workdir) / 'model.npz', ema=config.ema
  )
  print(f'Wrote {path}')

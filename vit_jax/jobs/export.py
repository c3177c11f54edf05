"""Exports a training checkpoint as a published-layout .npz (or timm's
safetensors: --config.export=npz,safetensors).

  python main.py --config=configs/export.py --config.init=WORKDIR --workdir=OUT

writes OUT/model.npz (and OUT/model.json, the model description this
project reads back). Other tools (timm, the original code) load the .npz.
"""

import ml_collections

from vit_jax import checkpoints


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  if not config.init:
    raise ValueError('Set --config.init to the workdir to export.')
  paths = checkpoints.export(
    config.init, workdir, config.get('export', 'npz'), ema=config.ema
  )
  print('Wrote', ', '.join(map(str, paths)))

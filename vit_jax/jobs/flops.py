"""The flops job: the paper's compute accounting, from the configs.

  python main.py --config=configs/flops.py --workdir=DIR

prints and writes to DIR/flops.md and DIR/flops.json:
- the rows of the paper's JFT results table (Table 6): model, epochs,
  forward GFLOPs per image, parameters and pretraining exaFLOPs computed
  from each row's config, beside the paper's exaFLOPs (`compute_table.results_table`;
  `--config.table=imagenet21k` gives each config's own recipe on another
  dataset, without a paper column);
- the analytic forward FLOPs and parameters of every registered model (or
  of `--config.models=ViT-B_16,BiT-R50x1`) at `config.image_size` with a
  `config.num_classes` head.
FLOPs count 2 per multiply-add of matrix products and convolutions, as the
paper does (see vit_jax/analysis/flops.py).
"""

from typing import Any

import ml_collections
import numpy as np

from vit_jax import config_utils
from vit_jax import workdir as workdir_lib
from vit_jax.analysis import compute_table, flops
from vit_jax.models import list_models


def model_rows(
  names: list[str], image_size: int, num_classes: int
) -> list[dict[str, Any]]:
  """Forward GFLOPs and parameters of each model; `error` where it fails."""
  rows = []
  for name in names:
    try:
      rows.append(
        dict(
          model=name,
          gflops=flops.forward_flops(name, image_size, num_classes) / 1e9,
          params=flops.param_count(name, image_size, num_classes),
        )
      )
    except ValueError as e:  # e.g. a resolution the patches do not tile.
      rows.append(dict(model=name, error=str(e)))
  return rows


def format_models(
  rows: list[dict[str, Any]], image_size: int, num_classes: int
) -> str:
  lines = [
    f'| Model ({image_size} px, {num_classes} classes) | Fwd GFLOPs | '
    'Params (M) |',
    '|---|---|---|',
  ]
  for row in rows:
    if 'error' in row:
      lines.append(f'| {row["model"]} | - | - ({row["error"]}) |')
    else:
      lines.append(
        f'| {row["model"]} | {row["gflops"]:.2f} | {row["params"] / 1e6:.2f} |'
      )
  return '\n'.join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  if config.table not in config.row_configs:
    raise ValueError(
      f'config.table={config.table!r}; use one of {sorted(config.row_configs)}.'
    )
  table = compute_table.results_table(
    config.row_configs[config.table], config.table
  )
  names = config_utils.names(config.models) or list_models()
  models = model_rows(names, config.image_size, config.num_classes)
  diffs = [abs(r['rel_diff']) for r in table if r['rel_diff'] is not None]
  results = {
    'table': config.table,
    'results_table': table,
    'max_abs_rel_diff': float(np.max(diffs)) if diffs else None,
    'image_size': config.image_size,
    'num_classes': config.num_classes,
    'models': models,
  }
  heading = (
    'Pretraining compute, Table 6 of the paper (JFT-300M)'
    if config.table == 'jft'
    else f'Pretraining compute on {config.table}'
  )
  markdown = (
    f'## {heading}\n\n{compute_table.format_table(table)}\n\n'
    f'## Forward FLOPs and parameters\n\n'
    f'{format_models(models, config.image_size, config.num_classes)}\n'
  )
  workdir_lib.write_json(workdir, 'flops.json', results)
  workdir_lib.write_text(workdir, 'flops.md', markdown)
  print(markdown)
  if diffs:
    print(
      f'Largest difference from the paper: {results["max_abs_rel_diff"]:.1%}'
    )
  return results

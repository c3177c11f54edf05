"""Compute accounting: the paper's results-table rows and per-model FLOPs.

  python main.py --config=configs/flops.py --workdir=DIR
  python main.py --config=configs/flops.py --config.image_size=384 \
      --config.models=ViT-B_16,ViT-L_16 --workdir=DIR
"""

import ml_collections

from configs import common


def get_config():
  config = ml_collections.ConfigDict()
  config.job = 'flops'
  # The configs' pretraining dataset: 'jft' (the paper's table, with its
  # exaFLOPs column), 'imagenet21k' or 'imagenet2012'.
  config.table = 'jft'
  # Every row's config on every pretraining dataset, for the table.
  config.row_configs = ml_collections.ConfigDict({
    dataset: {row: common.table_row(row, dataset) for row in common.TABLE_ROWS}
    for dataset in common.PRETRAIN_DATASETS
  })  # fmt: skip
  # Per-model forward FLOPs and parameters at this resolution and head.
  config.image_size = 224
  config.num_classes = 1000
  config.models = ''  # Comma-separated registry names; empty: all of them.
  return config

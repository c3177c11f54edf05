"""ViT-H_14 pretraining (Table 3): JFT-300M lr 3e-4, 14 epochs.

Usage: python main.py --config=configs/vit_h14.py:DATASET --workdir=DIR, DATASET in
{jft, imagenet21k, imagenet2012} (default imagenet21k).
"""

from configs import common


def get_config(arg='imagenet21k'):
  return common.table_row('vit_h14', arg)

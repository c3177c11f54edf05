"""BiT-R101x1 pretraining (Table 3): JFT-300M lr 8e-4, 7 epochs.

Usage: python main.py --config=configs/bit_r101x1.py:DATASET --workdir=DIR, DATASET in
{jft, imagenet21k, imagenet2012} (default imagenet21k).
"""

from configs import common


def get_config(arg='imagenet21k'):
  return common.table_row('bit_r101x1', arg)

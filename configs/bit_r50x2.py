"""BiT-R50x2 pretraining (Table 3): JFT-300M lr 1e-3, 7 epochs.

Usage: python main.py --config=configs/bit_r50x2.py:DATASET --workdir=DIR, DATASET in
{jft, imagenet21k, imagenet2012} (default imagenet21k).
"""

from configs import common


def get_config(arg='imagenet21k'):
  return common.table_row('bit_r50x2', arg)

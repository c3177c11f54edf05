"""ViTc-S_16 (ViTC-4GF of "Early Convolutions Help Transformers See Better").

Usage: python main.py --config=configs/vitc_s16.py:DATASET --workdir=DIR, DATASET in
{imagenet2012, imagenet21k} (default imagenet2012).
"""

from configs import common


def get_config(arg='imagenet2012'):
  return common.pretrain_vitc('ViTc-S_16', arg)

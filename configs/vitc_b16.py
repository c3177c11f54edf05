"""ViTc-B_16 (ViTC-18GF of "Early Convolutions Help Transformers See Better").

Usage: python main.py --config=configs/vitc_b16.py:DATASET --workdir=DIR, DATASET in
{imagenet2012, imagenet21k} (default imagenet2012).
"""

from configs import common


def get_config(arg='imagenet2012'):
  return common.pretrain_vitc('ViTc-B_16', arg)

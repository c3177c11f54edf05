"""R50+ViT-L_16 pretraining (Table 3): JFT-300M lr 4e-4, 7 epochs (the 14-epoch row:
--config.num_epochs=14).

Usage: python main.py --config=configs/r50_vit_l16.py:DATASET --workdir=DIR, DATASET in
{jft, imagenet21k, imagenet2012} (default imagenet21k).
"""

from configs import common


def get_config(arg='imagenet21k'):
  return common.table_row('r50_vit_l16', arg)

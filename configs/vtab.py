"""VTAB-1k: `--config=configs/vtab.py:MODEL` fine-tunes `config.init` on
all 19 tasks (or `--config.vtab_tasks=caltech101,dtd`) and prints the table.

  python main.py --config=configs/vtab.py:ViT-B_16 --config.init=ViT-B_16.npz \
      --config.data_dir=TFDS_DIR --workdir=DIR
"""

from configs import common


def get_config(arg='ViT-B_16'):
  config = common.finetune(arg, 'vtab/caltech101')
  config.job = 'vtab'
  config.vtab_tasks = ()  # () is all 19
  return config

"""Few-shot linear evaluation of a checkpoint's frozen features:

  python main.py --config=configs/fewshot.py --config.init=CKPT \
      --config.fewshot.datasets=digits,cifar10 --workdir=DIR

Each dataset's 'train' split is the pool of k-shot examples and its 'test'
split is scored; `--config.splits.train=...` narrows the pool.
"""

import ml_collections

from vit_jax.jobs import common


def get_config():
  config = common.default_config('fewshot')
  config.fewshot = ml_collections.ConfigDict()
  config.fewshot.datasets = ('digits',)
  config.fewshot.shots = (1, 5, 10, 25)
  config.fewshot.seeds = 3
  config.fewshot.l2_reg = 2.0**10
  return config

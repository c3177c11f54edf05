"""Top-1 (or ReaL) accuracy of a checkpoint on a dataset split:

  python main.py --config=configs/evaluate.py --config.init=CKPT \
      --config.dataset=cifar10 --config.eval_split=test --workdir=DIR

CKPT is a .npz (published or exported), an orbax checkpoint directory or a
training workdir. A .npz without its .json description also needs
--config.model_name (and architecture overrides in --config.model).
"""

from vit_jax.jobs import common


def get_config():
  config = common.default_config('evaluate')
  config.eval_split = 'test'  # 'train', 'val', 'test' or 'train_full'
  return config

"""Figures of what a ViT learned (the paper's Figs. 6, 7 and 11):

  python main.py --config=configs/inspect.py --config.init=CKPT --workdir=DIR

Writes the patch-embedding filters, position-embedding similarity, mean
attention distance and attention rollout figures (PNG) and inspect.json.
"""

from vit_jax.jobs import common


def get_config():
  config = common.default_config('inspect')
  config.split = 'test'  # Images from this split of config.dataset.
  config.num_images = 128  # Averaged over for the attention distances.
  config.rollout_images = 8  # Drawn with their attention rollout.
  config.num_components = 28  # Principal components of the filters.
  config.inspect_batch_size = 16  # Images per forward pass.
  return config

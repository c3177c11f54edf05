"""Top-k classes of image files from a checkpoint:

  python main.py --config=configs/predict.py --config.init=CKPT \
      --config.images=a.png,b.jpg --config.dataset=digits --workdir=DIR

Class names come from --config.class_names (a file, one name per line),
else from the checkpoint (saved by training), else from --config.dataset;
without any, classes are numbered.
"""

from ml_collections import config_dict

from vit_jax.jobs import common


def get_config():
  config = common.default_config('predict')
  config.images = ''  # Comma-separated image files.
  config.top_k = 5
  config.class_names = config_dict.placeholder(str)
  config.dataset = ''  # Only for its class names.
  return config

"""Export a training workdir as a published-layout .npz (and/or timm's
safetensors, --config.export=npz,safetensors):

python main.py --config=configs/export.py --config.init=WORKDIR --workdir=OUT
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.job = 'export'
  config.init = config_dict.placeholder(str)  # the workdir to export
  config.ema = False  # export the Polyak-averaged weights instead
  # 'npz' (OUT/model.npz), 'safetensors' (OUT/timm/, timm's layout) or both.
  config.export = 'npz'
  return config

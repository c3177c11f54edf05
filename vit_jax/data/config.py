"""The data keys of a job config, kept apart from the input pipeline.

Nothing here imports TensorFlow, so that configs (configs/common.py), the
models and the benchmark job load where only JAX is installed (an
accelerator image); the pipeline imports it when it is used.
"""

import ml_collections
from ml_collections import config_dict

# The four splits a job reads (vit_jax/data/presets.py says what each is).
SPLITS = ('train', 'val', 'test', 'train_full')


def default_config() -> ml_collections.ConfigDict:
  """The data keys of a job config, with their defaults."""
  return ml_collections.ConfigDict(
    {
      # 'digits', a preset (list_presets()), 'tfds:NAME' or a tfds name, or
      # a folder of images: root/<class>/* or root/train/<class>/* with
      # optional root/val/<class>/* and root/test/<class>/*.
      'dataset': 'digits',
      'data_dir': config_dict.placeholder(str),  # tfds' default when None.
      'download': False,  # Only prepared tfds data unless True.
      # tfds split strings overriding the dataset's defaults.
      'splits': {split: config_dict.placeholder(str) for split in SPLITS},
      'image_size': 224,
      'batch_size': 512,  # Global.
      'eval_batch_size': 512,  # Global.
      'seed': 0,
      'loss': 'softmax_xent',  # Or 'sigmoid_xent' (multi-hot labels).
      'pp': {
        'train_crop': 'inception',  # Or 'resize'.
        'min_area': 0.05,
        'flip': True,
        'eval_crop': 'resize',  # Or 'central' (resize 256/224, crop).
        'mixup_alpha': 0.0,  # Mixup's p: ratios from Beta(p, p).
        # RandAugment as big_vision's randaug(layers, magnitude); 0 layers
        # is off.
        'randaugment_layers': 0,
        'randaugment_magnitude': 10,
        # An AugReg setting ('light1', 'medium2', ...: preprocess.AUGREG)
        # setting the three keys above.
        'augreg': config_dict.placeholder(str),
      },
      'shuffle_buffer': 10_000,  # Records per process (tfds sources).
      'prefetch': 2,  # Batches in flight to the devices.
      'imagenet21k_name': 'imagenet21k',  # tfds name or directory.
    }
  )

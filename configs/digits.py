"""The embedded default: a small ViT pretrained on scikit-learn's digits.

1,797 real 8x8 scans of handwritten digits ship with scikit-learn, so this
runs anywhere without a download, in a few minutes on a laptop CPU:

  python main.py --config=configs/digits.py --workdir=/tmp/vit_digits

The images are upsampled to 16x16 and cut into 4x4 patches (16 tokens).
"""

from configs import common


def get_config():
  config = common.base()
  config.job = 'pretrain'
  config.dataset = 'digits'
  config.model_name = 'ViT-Ti_16'
  # A ViT-Ti/16 shrunk to the data: 4 blocks of width 64 on 4x4 patches.
  config.model.patch_size = 4
  config.model.hidden_size = 64
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.image_size = 16
  # Digits are neither crop- nor flip-invariant: plain resizing only.
  config.pp.train_crop = 'resize'
  config.pp.flip = False
  config.model.dropout_rate = 0.1
  config.loss = 'softmax_xent'
  config.batch_size = 128
  config.eval_batch_size = 256
  config.num_epochs = 100.0
  config.optimizer.name = 'adam'
  config.optimizer.weight_decay = 1e-4
  config.lr.base = 1e-3
  config.lr.warmup_steps = 100
  config.lr.decay = 'cosine'
  config.lr.end = 0.0
  config.test_split = 'test'
  config.log_every = 50
  config.eval_every = 250
  config.checkpoint_every = 250
  config.keep_checkpoints = 2
  config.export_npz = True  # workdir/model.npz, for fine-tuning elsewhere
  return config

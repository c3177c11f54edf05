"""ViT-B/16 pretrained by masked patch prediction (App. B.1.2).

Usage: python main.py --config=configs/vit_b16_mpp.py:DATASET --workdir=DIR,
DATASET in {jft, imagenet21k, imagenet2012} (default jft, as in the paper).

The paper's schedule: 1M steps at batch 4096 (about 14 JFT epochs), Adam
with base learning rate 2e-4, 10k warm-up steps and cosine decay. Weight
decay, dropout and preprocessing are the dataset's pretraining recipe (the
paper gives none of them for this experiment); `--config.mpp.target` picks
the alternative targets. The checkpoint fine-tunes like any other
(configs/finetune.py): the fine-tuning job drops the MPP-only parameters.
"""

from configs import common


def get_config(arg='jft'):
  config = common.pretrain('ViT-B_16', arg, jft_lr=2e-4)
  config.objective = 'masked_patch_prediction'
  # No class head: the encoder is all that transfers.
  config.num_classes = None
  config.model.head_bias_init = None
  config.total_steps = 1_000_000
  config.lr.base = 2e-4
  config.lr.warmup_steps = 10_000
  config.lr.decay = 'cosine'
  config.lr.end = 0.0
  return config

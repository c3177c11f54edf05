"""Fine-tuning (Table 4): `--config=configs/finetune.py:MODEL,DATASET`.

  python main.py --config=configs/finetune.py:ViT-B_16,cifar10 \
      --config.init=ViT-B_16.npz --workdir=DIR

`config.init` is a published-layout .npz, or a workdir or checkpoint
directory of this project's pretraining or fine-tuning jobs. DATASET is one
of imagenet2012, cifar10, cifar100, oxford_iiit_pet, oxford_flowers102,
vtab/<task> or digits (the embedded default). `--config.sweep=True` runs the
paper's learning-rate grid with selection on the held-out split.
"""

from configs import common


def get_config(arg='ViT-B_16,cifar10'):
  model_name, dataset = arg.split(',')
  return common.finetune(model_name, dataset)

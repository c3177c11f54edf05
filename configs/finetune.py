"""Fine-tuning (Table 4): `--config=configs/finetune.py:MODEL,DATASET`.

  python main.py --config=configs/finetune.py:ViT-B_16,cifar10 \
      --config.init=ViT-B_16.npz --workdir=DIR

`config.init` is a published-layout .npz, or a workdir or checkpoint
directory of this project's pretraining or fine-tuning jobs. DATASET is one
of imagenet2012, cifar10, cifar100, oxford_iiit_pet, oxford_flowers102,
vtab/<task>, digits (the embedded default), or the path of a folder of
your own images (root/<class>/*, split folders optional): a DATASET with a
'/' or an existing directory. A folder gets the paper's learning-rate grid
for its smaller datasets and steps from its number of training images
(configs/common.py, STEPS_FROM_DATA), at 384 px (`--config.image_size=224`
has a third of the tokens). `--config.sweep=True` runs the learning-rate
grid with selection on the held-out split.
"""

from configs import common


def get_config(arg='ViT-B_16,cifar10'):
  # A path may hold commas; a model name does not.
  model_name, dataset = arg.split(',', 1)
  return common.finetune(model_name, dataset)

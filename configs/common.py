"""Shared config pieces: the base config and the paper's recipes.

A config file is a thin `get_config(arg)` that calls one of the builders
here; `--config=configs/vit_b16.py:imagenet21k` passes 'imagenet21k' as
`arg`. Every key can be overridden on the command line
(`--config.batch_size=256`); an unknown key is an error.
"""

import math
import os

import ml_collections
from ml_collections import config_dict

from vit_jax import data, models

# Table 3 of the paper: pretraining datasets and their recipes. Weight decay
# is in the paper's convention (decoupled and multiplied by the learning
# rate, as optax.adamw does).
PRETRAIN_DATASETS = {
  'jft': dict(
    # JFT-300M is internal: point `dataset` at any tfds name or directory
    # with the same role. 303M images and 18,291 classes (Sun et al., 2017).
    dataset='jft300m',
    num_classes=18_291,
    num_train_examples=303_000_000,
    num_epochs=7,
    weight_decay=0.1,
    dropout_rate=0.0,
    decay='linear',
  ),
  'imagenet21k': dict(
    dataset='imagenet21k',
    num_classes=21_843,
    num_train_examples=14_197_122,
    num_epochs=90,
    base_lr=1e-3,
    weight_decay=0.03,
    dropout_rate=0.1,
    decay='linear',
  ),
  'imagenet2012': dict(
    dataset='imagenet2012',
    num_classes=1000,
    num_train_examples=None,  # 99% of the 1,281,167 images; from the data.
    num_epochs=300,
    base_lr=3e-3,
    weight_decay=0.3,
    dropout_rate=0.1,
    decay='cosine',
  ),
}

# Table 4: fine-tuning steps and learning-rate grids, and the warm-up of the
# released fine-tuning code (the paper does not give one).
FINETUNE_DATASETS = {
  'imagenet2012': dict(steps=20_000, lrs=(0.003, 0.01, 0.03, 0.06), warmup=500),
  'cifar10': dict(steps=10_000, lrs=(0.001, 0.003, 0.01, 0.03), warmup=500),
  'cifar100': dict(steps=10_000, lrs=(0.001, 0.003, 0.01, 0.03), warmup=500),
  'oxford_iiit_pet': dict(steps=500, lrs=(0.001, 0.003, 0.01, 0.03), warmup=50),
  'oxford_flowers102': dict(
    steps=500, lrs=(0.001, 0.003, 0.01, 0.03), warmup=50
  ),
  'vtab': dict(steps=2_500, lrs=(0.01,), warmup=200),
  # The embedded default: digits fine-tuned at a higher resolution.
  'digits': dict(steps=300, lrs=(0.003, 0.01, 0.03), warmup=30),
}
# Your own images (a folder): the grid of Table 4's datasets other than
# ImageNet; the steps and warm-up follow from the data (`STEPS_FROM_DATA`).
OWN_IMAGES = dict(steps=None, lrs=(0.001, 0.003, 0.01, 0.03), warmup=None)

# How long a run on data the paper did not use is, from the number N of
# training images (resolved by the finetune job when config.total_steps is
# None): about 100 epochs at batch 512, as Table 4's CIFAR runs (10k steps
# for 49k images), at least 500 steps as Pets and Flowers (3.3k and 0.9k
# images) and at most 20k as ImageNet (1.27M images); the warm-up is a tenth
# of the steps, at most 500 (50 of 500, 500 of 10k). The batch is clipped to
# N.
STEPS_FROM_DATA = dict(epochs=100.0, min_steps=500, max_steps=20_000)

# The pretraining rows of the paper's results table (Table 6): config file
# -> (model, JFT-300M base learning rate, JFT epochs). `configs/<row>.py` is
# `table_row(<row>, arg)`; the flops job is handed every row's config.
TABLE_ROWS = {
  'bit_r101x1': ('BiT-R101x1', 8e-4, 7),
  'bit_r152x1': ('BiT-R152x1', 6e-4, 7),
  'bit_r152x2': ('BiT-R152x2', 6e-4, 7),
  'bit_r200x3': ('BiT-R200x3', 6e-4, 14),
  'bit_r50x1': ('BiT-R50x1', 1e-3, 7),
  'bit_r50x2': ('BiT-R50x2', 1e-3, 7),
  'r50_vit_b16': ('R50+ViT-B_16', 8e-4, 7),
  'r50_vit_b32': ('R50+ViT-B_32', 8e-4, 7),
  'r50_vit_l16': ('R50+ViT-L_16', 4e-4, 7),
  'r50_vit_l32': ('R50+ViT-L_32', 2e-4, 7),
  'vit_b16': ('ViT-B_16', 8e-4, 7),
  'vit_b32': ('ViT-B_32', 8e-4, 7),
  'vit_h14': ('ViT-H_14', 3e-4, 14),
  'vit_l16': ('ViT-L_16', 4e-4, 7),
  'vit_l32': ('ViT-L_32', 6e-4, 7),
}

# Table 2's headline ImageNet runs: higher resolution and Polyak averaging.
HEADLINE_IMAGENET = {'ViT-L_16': 512, 'ViT-H_14': 518}


def base() -> ml_collections.ConfigDict:
  """Every key any job reads, with neutral defaults."""
  config = ml_collections.ConfigDict()
  config.job = 'pretrain'
  # What pretraining learns: 'supervised' (the labels) or
  # 'masked_patch_prediction' (App. B.1.2; the labels are ignored).
  config.objective = 'supervised'
  # Masked patch prediction: of the patch embeddings, `corrupt_rate` are
  # corrupted; of those, `mask_rate` become [mask], `random_rate` another
  # patch's embedding and the rest stay. Each corrupted patch predicts its
  # `target`: 'mean_color' (3-bit mean colour, 512 classes), 'downsized_color'
  # (4x4 cells in 3-bit colour) or 'pixels' (L2 regression).
  config.mpp = ml_collections.ConfigDict()
  config.mpp.target = 'mean_color'
  config.mpp.corrupt_rate = 0.5
  config.mpp.mask_rate = 0.8
  config.mpp.random_rate = 0.1

  # Model: a registry name plus attribute overrides (None keeps the
  # registry's value).
  config.model_name = 'ViT-B_16'
  config.model = ml_collections.ConfigDict()
  config.model.dtype = 'float32'
  config.model.scan = False
  config.model.remat_policy = 'none'
  config.model.dropout_rate = config_dict.placeholder(float)
  config.model.attention_dropout_rate = config_dict.placeholder(float)
  config.model.representation_size = config_dict.placeholder(int)
  config.model.classifier = config_dict.placeholder(str)
  config.model.head_bias_init = config_dict.placeholder(float)
  # Architecture overrides (a tiny model, or a published .npz that comes
  # without a description).
  config.model.patch_size = config_dict.placeholder(int)
  config.model.hidden_size = config_dict.placeholder(int)
  config.model.num_layers = config_dict.placeholder(int)
  config.model.mlp_dim = config_dict.placeholder(int)
  config.model.num_heads = config_dict.placeholder(int)
  # Hybrids: units per ResNet stage (() for the root alone) and its width.
  config.model.resnet_stages = config_dict.placeholder(tuple)
  config.model.resnet_width = config_dict.placeholder(float)
  # 'auto', 'xla', 'cudnn' or 'product' (see vit_jax/models/attention.py).
  config.model.attention = config_dict.placeholder(str)
  # Dense products: 'auto', 'xla' or 'onednn' (see vit_jax/models/common.py).
  config.model.matmul = config_dict.placeholder(str)
  # The patch embedding: 'auto' (a product on CPUs, a convolution
  # elsewhere), 'conv' or 'product' (see vit_jax/models/patch_embedding.py).
  config.model.patch_embedding = config_dict.placeholder(str)
  # Weights trained elsewhere: exact GELU (False: timm, Hugging Face) and
  # big_vision's 'sincos2d' position embedding or classifier='map'.
  config.model.gelu_approximate = config_dict.placeholder(bool)
  config.model.posemb = config_dict.placeholder(str)
  # None: from the dataset.
  config.num_classes = config_dict.placeholder(int)
  config.num_train_examples = config_dict.placeholder(int)

  # Data (dataset, splits, image_size, batch sizes, preprocessing, seed,
  # loss): see vit_jax/data.
  config.update(data.default_config())

  # Optimisation.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adam'  # 'adam' (decoupled weight decay) or 'sgd'
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.0
  # False exempts 1-D parameters (biases, norm scales) from weight decay.
  config.optimizer.decay_1d_params = True
  # 'bfloat16' halves the memory of Adam's first moment / SGD's trace.
  config.optimizer.mu_dtype = 'float32'
  config.optimizer.grad_clip_norm = 1.0
  config.lr = ml_collections.ConfigDict()
  config.lr.base = 1e-3
  config.lr.warmup_steps = 10_000
  config.lr.warmup_epochs = config_dict.placeholder(float)  # overrides steps
  config.lr.decay = 'linear'  # 'linear', 'cosine' or 'constant'
  config.lr.warmup_init = 0.0  # warm-up starts at this multiple of base
  config.lr.end = 1e-5  # the decay ends at this learning rate
  config.num_epochs = config_dict.placeholder(float)
  config.total_steps = config_dict.placeholder(int)  # overrides num_epochs
  config.grad_accum_steps = 1
  config.label_smoothing = 0.0
  config.ema_decay = 0.0  # Polyak averaging of the evaluated weights

  # Sharding.
  config.sharding = 'dp'  # 'dp', 'fsdp' or 'tp'
  config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  config.step = 'jit'  # 'jit' or 'shard_map' (data parallel)

  # Splits (see vit_jax/data): trained on, evaluated periodically (logged
  # as eval_*), and evaluated once at the end (logged as <split>_*; None to
  # skip).
  config.train_split = 'train'
  config.eval_split = 'val'
  config.test_split = config_dict.placeholder(str)

  # Checkpoints, evaluation and logs.
  config.init = config_dict.placeholder(str)  # checkpoint to start from
  # Where published names (init=augreg:...) are cached; None:
  # $VIT_JAX_WEIGHTS, else ~/.cache/vit_jax/weights.
  config.weights_cache = config_dict.placeholder(str)
  config.export_npz = False  # also write workdir/model.npz at the end
  # The formats exported then: 'npz' (workdir/model.npz), 'safetensors'
  # (workdir/timm/: timm's model.safetensors and config.json), or both.
  config.export = 'npz'
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.log_every = 50
  config.eval_every = 1000  # 0: only at the end
  config.fewshot = ml_collections.ConfigDict()
  config.fewshot.every = 0  # 0: off
  config.fewshot.shots = (1, 5, 10, 25)
  config.fewshot.seeds = 3
  config.fewshot.l2_reg = 2.0**10
  config.fewshot.datasets = ()
  # More evaluators, {name: dict(type=..., every=..., ...)} (see
  # vit_jax/evaluators); one named like a built-in one replaces it.
  config.evals = ml_collections.ConfigDict()
  return config


def pretrain(
  model_name: str, dataset_arg: str, *, jft_lr: float, jft_epochs: int = 7
) -> ml_collections.ConfigDict:
  """A row of Table 3: the paper's pretraining recipe on one dataset.

  Args:
    model_name: registry name of the model.
    dataset_arg: 'jft', 'imagenet21k' or 'imagenet2012'.
    jft_lr: the row's base learning rate on JFT-300M.
    jft_epochs: the row's JFT epochs (7 or 14).
  """
  if dataset_arg not in PRETRAIN_DATASETS:
    raise ValueError(
      f'Unknown pretraining dataset {dataset_arg!r}; use one of '
      f'{sorted(PRETRAIN_DATASETS)} (e.g. --config=configs/vit_b16.py:'
      'imagenet21k).'
    )
  recipe = PRETRAIN_DATASETS[dataset_arg]
  config = base()
  config.job = 'pretrain'
  config.model_name = model_name
  config.dataset = recipe['dataset']
  config.num_classes = recipe['num_classes']
  config.num_train_examples = recipe['num_train_examples']
  config.num_epochs = float(
    jft_epochs if dataset_arg == 'jft' else recipe['num_epochs']
  )
  config.image_size = 224
  config.batch_size = 4096
  config.eval_batch_size = 4096
  config.pp.train_crop = 'inception'
  config.pp.flip = True

  # Multi-label sigmoid cross-entropy with the head bias at -log(classes),
  # so that initial predictions are near the label prior (-10 for JFT and
  # ImageNet-21k as in the released code).
  config.loss = 'sigmoid_xent'
  if dataset_arg == 'imagenet2012':
    config.model.head_bias_init = -math.log(recipe['num_classes'])
  else:
    config.model.head_bias_init = -10.0
  config.model.dropout_rate = recipe['dropout_rate']
  config.optimizer.name = 'adam'
  config.optimizer.weight_decay = recipe['weight_decay']
  config.optimizer.grad_clip_norm = 1.0
  config.lr.base = jft_lr if dataset_arg == 'jft' else recipe['base_lr']
  config.lr.warmup_steps = 10_000
  config.lr.decay = recipe['decay']
  config.lr.end = 1e-5 if recipe['decay'] == 'linear' else 0.0
  config.eval_every = 10_000
  config.checkpoint_every = 2_000
  config.fewshot.every = 10_000
  return config


def pretrain_vit(model_name: str, dataset_arg: str, **kwargs):
  """ViT and hybrid rows: the pretraining head has a tanh hidden layer of
  width D (the paper's "MLP with one hidden layer")."""
  config = pretrain(model_name, dataset_arg, **kwargs)
  spec = models.model_spec(model_name)
  config.model.representation_size = spec.kwargs['hidden_size']
  return config


def table_row(row: str, dataset_arg: str) -> ml_collections.ConfigDict:
  """The config of a row of `TABLE_ROWS` on a pretraining dataset."""
  model_name, jft_lr, jft_epochs = TABLE_ROWS[row]
  builder = pretrain if model_name.startswith('BiT-') else pretrain_vit
  return builder(model_name, dataset_arg, jft_lr=jft_lr, jft_epochs=jft_epochs)


def pretrain_vitc(
  model_name: str, dataset_arg: str
) -> ml_collections.ConfigDict:
  """ViTc rows: the ImageNet recipe of Xiao et al. (pycls), shared by the
  patchify (ViTP) and conv-stem (ViTC) models of that paper.

  AdamW with decoupled weight decay 0.24 exempting biases and norms, 400
  epochs, 5 warm-up epochs from 0.1 x lr, half-cosine to 0.005 x lr, label
  smoothing 0.1, mixup 0.8 with RandAugment, and an EMA of the weights.
  AutoAugment and CutMix of the original are replaced by RandAugment and
  mixup.
  """
  recipes = {
    'imagenet2012': dict(
      dataset='imagenet2012', classes=1000, epochs=400, batch=2048, lr=1e-3
    ),
    'imagenet21k': dict(
      dataset='imagenet21k', classes=21_843, epochs=90, batch=4096, lr=2e-3
    ),
  }
  if dataset_arg not in recipes:
    raise ValueError(
      f'Unknown pretraining dataset {dataset_arg!r} for {model_name}; use '
      f'one of {sorted(recipes)}.'
    )
  recipe = recipes[dataset_arg]
  config = base()
  config.job = 'pretrain'
  config.model_name = model_name
  config.dataset = recipe['dataset']
  config.num_classes = recipe['classes']
  if dataset_arg == 'imagenet21k':
    config.num_train_examples = PRETRAIN_DATASETS['imagenet21k'][
      'num_train_examples'
    ]
  config.num_epochs = float(recipe['epochs'])
  config.image_size = 224
  config.batch_size = recipe['batch']
  config.eval_batch_size = 1024
  config.pp.train_crop = 'inception'
  config.pp.flip = True
  config.pp.eval_crop = 'central'
  config.pp.randaugment_layers = 2
  config.pp.randaugment_magnitude = 9
  config.pp.mixup_alpha = 0.8
  config.loss = 'softmax_xent'
  config.label_smoothing = 0.1
  config.optimizer.name = 'adam'
  config.optimizer.weight_decay = 0.24
  config.optimizer.decay_1d_params = False
  config.optimizer.grad_clip_norm = 0.0
  config.lr.base = recipe['lr']
  config.lr.decay = 'cosine'
  config.lr.warmup_init = 0.1
  config.lr.end = 0.005 * recipe['lr']
  config.lr.warmup_epochs = 5.0
  # pycls averages every 32 steps with alpha = 1e-5 * batch / epochs * 32;
  # this is the same decay per step.
  config.ema_decay = (1 - 1e-5 * recipe['batch'] / recipe['epochs'] * 32) ** (
    1 / 32
  )
  config.eval_every = 5_000
  return config


def is_image_folder(dataset: str) -> bool:
  """Whether a DATASET argument is a path (to a folder of images)."""
  if dataset.startswith(('vtab/', 'tfds:')):
    return False
  return '/' in dataset or os.path.isdir(os.path.expanduser(dataset))


def _finetune_recipe(dataset: str) -> dict:
  if dataset.startswith('vtab/'):
    return FINETUNE_DATASETS['vtab']
  if is_image_folder(dataset):
    return OWN_IMAGES
  if dataset not in FINETUNE_DATASETS:
    raise ValueError(
      f'No fine-tuning recipe for {dataset!r}; use one of '
      f'{sorted(FINETUNE_DATASETS)}, vtab/<task> or the path of a folder of '
      'images (root/<class>/*), or start from another dataset and override '
      '--config.dataset.'
    )
  return FINETUNE_DATASETS[dataset]


def finetune(model_name: str, dataset: str) -> ml_collections.ConfigDict:
  """Table 4: the transfer recipe of one model on one dataset.

  SGD with momentum 0.9, batch 512, no weight decay, global-norm clipping at
  1, cosine decay after a short warm-up, at resolution 384 (512 and 518 with
  Polyak averaging for the headline ImageNet runs of ViT-L/16 and ViT-H/14).
  `sweep=True` runs the learning-rate grid, selects on the held-out split,
  retrains on the whole training set and reports the test accuracy.

  A folder of images (a DATASET with a '/', or an existing directory) gets
  the grid of the paper's smaller datasets, and steps and warm-up from its
  number of training images (`STEPS_FROM_DATA`).
  """
  recipe = _finetune_recipe(dataset)
  config = base()
  config.job = 'finetune'
  config.model_name = model_name
  config.dataset = dataset
  config.total_steps = recipe['steps']
  # Where total_steps is None: steps (and a warm-up left None) from the
  # number of training images; see STEPS_FROM_DATA.
  config.steps_from_data = ml_collections.ConfigDict(STEPS_FROM_DATA)
  config.lr_grid = recipe['lrs']
  config.sweep = False
  config.keep_representation = False  # the paper's "drop-head" variant
  config.export_npz = True
  config.image_size = 384
  config.batch_size = 512
  config.eval_batch_size = 512
  config.pp.train_crop = 'inception'
  config.pp.flip = True
  config.loss = 'softmax_xent'
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 1.0
  config.lr.base = 0.01 if 0.01 in recipe['lrs'] else recipe['lrs'][0]
  config.lr.warmup_steps = config_dict.placeholder(int)
  config.lr.warmup_steps = recipe['warmup']
  config.lr.decay = 'cosine'
  config.lr.end = 0.0
  config.test_split = 'test'
  config.eval_every = 0
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  if dataset == 'imagenet2012' and model_name in HEADLINE_IMAGENET:
    config.image_size = HEADLINE_IMAGENET[model_name]
    config.ema_decay = 0.9999
  if dataset == 'digits':
    config.image_size = 32
    config.batch_size = 128
    config.eval_batch_size = 256
    config.pp.train_crop = 'resize'
    config.pp.flip = False
    config.log_every = 50
    config.checkpoint_every = 100
  return config

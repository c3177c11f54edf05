"""Throughput benchmark of a model's training step and inference.

Usage:
  python main.py --config=configs/benchmark.py:ViT-B_16 --workdir=DIR

The argument is a registry name (vit_jax.models.list_models()). Every key
can be overridden, e.g. --config.batch_size=8 --config.image_size=224
--config.model.dtype=float32 --config.model.scan=True
--config.model.remat_policy=nothing_saveable --config.sharding=fsdp
--config.benchmark.steps=15. The step is the project's training step with
SGD (momentum 0.9, global-norm clipping at 1) on random images and labels.
"""

import ml_collections

from configs import common


def get_config(arg: str = 'ViT-B_16') -> ml_collections.ConfigDict:
  config = common.base()
  config.job = 'benchmark'
  config.model_name = arg
  config.model.dtype = 'bfloat16'
  config.num_classes = 1000
  config.image_size = 224
  config.batch_size = 8
  config.loss = 'softmax_xent'

  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 1.0
  config.lr.base = 0.03
  config.lr.warmup_steps = 0
  config.lr.decay = 'constant'

  config.benchmark = ml_collections.ConfigDict()
  config.benchmark.warmup_steps = 2
  config.benchmark.steps = 10  # Timed steps, one by one.
  # Side of the square matmul that measures the peak FLOP/s (per device).
  config.benchmark.peak_matmul_size = 4096
  # Only compile the train step (e.g. to compare compile times).
  config.benchmark.compile_only = False
  # Extra steps traced with jax.profiler into <workdir>/profile.
  config.benchmark.profile_steps = 0
  # '' times inference with the trained float32 parameters; 'bfloat16'
  # casts the kernels once beforehand (vit_jax.models.common.cast_kernels).
  config.benchmark.inference_kernel_dtype = ''
  return config

"""Test set-up: 8 CPU devices so that every sharding path runs.

XLA reads its flags when jax initialises its backends, so they are set here,
before any test module imports jax.
"""

import os

os.environ['XLA_FLAGS'] = ' '.join(
  [
    os.environ.get('XLA_FLAGS', ''),
    '--xla_force_host_platform_device_count=8',
  ]
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# TensorFlow is only used for input pipelines; keep it off any accelerator
# and quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

"""Test set-up: 8 CPU devices so that every sharding path runs.

XLA reads its flags when jax initialises its backends, so they are set here,
before any test module imports jax.
"""

import atexit
import os
import shutil
import tempfile

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

# One persistent compilation cache for the session, shared by the pytest-xdist
# workers (they inherit this environment) and the main.py runs the tests
# start (helpers.COMPILATION_CACHE_FLAG): the many small programs that several
# tests build alike compile once. Kept out of the user's own cache.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='vit_jax_tests_xla_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
# Likewise the oneDNN custom calls' shared object (vit_jax/kernels/onednn.py),
# compiled once per session.
if 'VIT_JAX_KERNEL_CACHE' not in os.environ:
  _kernels = tempfile.mkdtemp(prefix='vit_jax_tests_kernels_')
  os.environ['VIT_JAX_KERNEL_CACHE'] = _kernels
  atexit.register(shutil.rmtree, _kernels, ignore_errors=True)

# Importing jax reads the JAX_* variables above, hence last; XLA reads
# XLA_FLAGS only when the backend starts.
from vit_jax import distributed

# On a slow, shared machine the 8 host devices can reach a collective far
# apart; XLA:CPU's default timeout would abort the test process.
distributed.set_cpu_collective_timeout()

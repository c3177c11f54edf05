"""The benchmark drivers' settings: config overrides and worker environment."""

import os
import sys

import pytest

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks')
)
import shared

TUNABLES = 'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0'


@pytest.mark.parametrize(
  'setting, env, overrides',
  [
    ('model.dtype=bfloat16', {}, ['model.dtype=bfloat16']),
    ('', {}, []),
    (
      'LD_PRELOAD=/usr/lib/libtcmalloc.so,model.dtype=float32,batch_size=8',
      {'LD_PRELOAD': '/usr/lib/libtcmalloc.so'},
      ['model.dtype=float32', 'batch_size=8'],
    ),
    # A value may hold '=' and ':'; only the name decides.
    (f'GLIBC_TUNABLES={TUNABLES}', {'GLIBC_TUNABLES': TUNABLES}, []),
    # Mixed case is a config key, not an environment variable.
    ('Model.dtype=float32', {}, ['Model.dtype=float32']),
  ],
)
def test_upper_case_names_are_the_workers_environment(setting, env, overrides):
  assert shared.split_setting(setting) == (env, overrides)

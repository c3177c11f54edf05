"""What the benchmark drivers (interleave.py, profile_kinds.py) share.

The flags naming the model, its timm twin, batch, resolution and timm's
environment, and the benchmark job's config with 'key=value' overrides.
"""

import re

from absl import flags

MODEL = flags.DEFINE_string('model', 'ViT-B_16', 'Registry name.')
TIMM_MODEL = flags.DEFINE_string(
  'timm_model', 'vit_base_patch16_224', 'The same model in timm.'
)
BATCH = flags.DEFINE_integer('batch', 8, 'Batch size.')
RES = flags.DEFINE_integer('res', 224, 'Image size.')
TIMM_PYTHON = flags.DEFINE_string(
  'timm_python', '/tmp/timm-venv/bin/python', "timm's interpreter."
)
TIMM_PYTHONPATH = flags.DEFINE_string(
  'timm_pythonpath',
  '',
  "Extra PYTHONPATH of timm's processes (e.g. a stand-in torchvision).",
)


def parse_value(value: str):
  """A command-line override's value: bool, int, float or string."""
  if value in ('True', 'False'):
    return value == 'True'
  for kind in (int, float):
    try:
      return kind(value)
    except ValueError:
      pass
  return value


def project_config(overrides: list[str]):
  """configs/benchmark.py's config for the flags, with 'key=value' overrides.

  Needs the repository's root on the path.
  """
  from configs import benchmark as benchmark_config

  config = benchmark_config.get_config(MODEL.value)
  config.batch_size = BATCH.value
  config.image_size = RES.value
  config.update_from_flattened_dict(
    dict((k, parse_value(v)) for k, v in (o.split('=', 1) for o in overrides))
  )
  return config


def split_setting(setting: str) -> tuple[dict[str, str], list[str]]:
  """A ','-separated setting's environment variables and config overrides.

  Upper-case names (`LD_PRELOAD=...`, `GLIBC_TUNABLES=...`) are environment
  variables of the worker's process, which must be set before it starts
  (the allocator is chosen then); the rest are config overrides, e.g.
  'LD_PRELOAD=/usr/lib/libtcmalloc.so,model.dtype=bfloat16'.
  """
  env, overrides = {}, []
  for item in filter(None, setting.split(',')):
    name, _, value = item.partition('=')
    if re.fullmatch(r'[A-Z_][A-Z0-9_]*', name):
      env[name] = value
    else:
      overrides.append(item)
  return env, overrides

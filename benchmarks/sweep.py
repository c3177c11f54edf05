"""Benchmarks a model under several settings, one fresh process each.

Each setting is a comma-separated list of config overrides; every run is a
separate process, so its peak host memory is its own. Prints a Markdown
table of training images/s, MFU, peak host (and device) memory and
compile time. For example, the rematerialisation table of the README:

  python benchmarks/sweep.py --model=ViT-B_16 --settings=\
'model.scan=False;model.scan=True;model.scan=True,model.remat_policy=\
nothing_saveable;model.scan=True,model.remat_policy=dots_saveable'

and the ViT-H/14 FSDP run (8 host devices):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python \
benchmarks/sweep.py --model=ViT-H_14 --settings='sharding=fsdp,\
model.scan=True,model.remat_policy=nothing_saveable' --steps=3
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MODEL = flags.DEFINE_string('model', 'ViT-B_16', 'Registry name.')
_SETTINGS = flags.DEFINE_string(
  'settings', 'model.scan=True', 'Settings separated by ";".'
)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per setting.')
_COMMON = flags.DEFINE_list(
  'common', [], 'Overrides shared by every setting, e.g. batch_size=8.'
)
_TIMEOUT = flags.DEFINE_integer('timeout', 3600, 'Seconds per setting.')
_CACHE = flags.DEFINE_string(
  'compilation_cache',
  None,
  "main.py's --compilation_cache for every run ('' disables the cache, as "
  'for compile times); its default when unset.',
)


def run_setting(overrides: list[str], workdir: str) -> dict:
  command = [
    sys.executable,
    os.path.join(REPO, 'main.py'),
    f'--config={os.path.join(REPO, "configs", "benchmark.py")}:{_MODEL.value}',
    f'--workdir={workdir}',
    f'--config.benchmark.steps={_STEPS.value}',
    *(f'--config.{o}' for o in [*_COMMON.value, *overrides]),
  ]
  if _CACHE.value is not None:
    command.append(f'--compilation_cache={_CACHE.value}')
  subprocess.run(
    command, check=True, capture_output=True, cwd=REPO, timeout=_TIMEOUT.value
  )
  with open(os.path.join(workdir, 'benchmark.json')) as f:
    return json.load(f)


def _gib(value) -> str:
  return '-' if value is None else f'{value / 2**30:.2f}'


def main(argv):
  del argv
  lines = [
    '| setting | train img/s (median, range) | MFU | peak host GiB | '
    'peak device GiB | step GiB (XLA) | compile s | cache hit |',
    '|---|---|---|---|---|---|---|---|',
  ]
  with tempfile.TemporaryDirectory() as tmp:
    for i, setting in enumerate(_SETTINGS.value.split(';')):
      overrides = [o for o in setting.split(',') if o]
      results = run_setting(overrides, os.path.join(tmp, str(i)))
      train = results['train']
      rates = train['images_per_s'] if train else None
      rate = (
        f'{rates["median"]:.2f} ({rates["min"]:.2f}-{rates["max"]:.2f})'
        if rates
        else '-'
      )
      mfu = f'{train["mfu"]:.1%}' if train else '-'
      line = (
        f'| {setting or "defaults"} | {rate} | {mfu} | '
        f'{_gib(results["memory"]["host_peak_bytes"])} | '
        f'{_gib(results["memory"]["device"]["peak_bytes"])} | '
        f'{_gib(results["memory"]["step_bytes"]["total"])} | '
        f'{results["compile"]["total_s"]:.1f} | '
        f'{results["compile"]["cache_hit"]} |'
      )
      print(line, flush=True)
      lines.append(line)
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)

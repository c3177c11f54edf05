"""Training steps of several settings and of timm, interleaved step by step.

Starts one worker process per setting of this project (config overrides)
and per timm dtype, each holding its model and compiled step, then runs
`--steps` rounds in which every worker takes one training step in turn
(A B C D A B C D ...), so that the load of a noisy machine falls on all of
them alike. Prints, as a Markdown table, each worker's median and range of
images/s, this project's rate over timm's in the same dtype and over its
first setting's (each the median of the per-round ratios) and each worker's
peak host memory (its own process).

  python benchmarks/interleave.py --steps=15
  python benchmarks/interleave.py --timm_dtypes= --settings=\
'model.scan=True;model.scan=True,model.remat_policy=nothing_saveable'

timm runs in its own environment (--timm_python), e.g.
`python3 -m venv /tmp/timm-venv && /tmp/timm-venv/bin/pip install torch timm`;
--timm_pythonpath adds to its PYTHONPATH (where torchvision has no wheel, a
directory holding a stand-in that lets timm import). Nothing of it is needed
by this project or its tests. On a GPU, --timm_device=cuda puts timm there
too, and XLA_PYTHON_CLIENT_PREALLOCATE=false leaves it the memory it needs
(benchmarks/gpu.sh). This file is also this project's worker
(--worker=project).
"""

import os
import statistics
import subprocess
import sys
import time

import shared
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STEPS = flags.DEFINE_integer('steps', 15, 'Timed steps of each worker.')
_MODE = flags.DEFINE_enum(
  'mode',
  'train',
  ['train', 'inference'],
  'What each worker times: a training step or the inference forward pass.',
)
_SETTINGS = flags.DEFINE_string(
  'settings',
  'model.dtype=bfloat16;model.dtype=float32',
  "This project's settings: ';'-separated lists of ','-separated config "
  'overrides and upper-case environment variables of that worker '
  "(e.g. 'LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4').",
)
_TIMM_DTYPES = flags.DEFINE_list(
  'timm_dtypes',
  ['bf16', 'fp32'],
  'timm runs: bf16 (autocast), fp32, and for inference bf16w (the model '
  'converted to bfloat16 once).',
)
_TIMM_DEVICE = flags.DEFINE_enum(
  'timm_device',
  'cpu',
  ['cpu', 'cuda'],
  "timm's device; this project runs on JAX's default backend (a GPU where "
  'JAX has one: leave it the memory it needs with '
  'XLA_PYTHON_CLIENT_PREALLOCATE=false).',
)
_TIMM_COMPILE = flags.DEFINE_bool(
  'timm_compile', False, 'timm runs `torch.compile` of its model.'
)
_WORKER = flags.DEFINE_enum(
  'worker', None, ['project'], 'Run as a worker (used by the driver).'
)
_OVERRIDES = flags.DEFINE_list('overrides', [], "A project worker's setting.")

_TIMM_DTYPES_OF = {'bfloat16': 'bf16', 'float32': 'fp32'}


def _project_train_step(config):
  """The benchmark job's compiled training step, as a closure."""
  from vit_jax.jobs import benchmark

  setup = benchmark.build(config)
  state = setup.new_state()

  def step():
    nonlocal state
    state, metrics = setup.train_step(state, setup.batch)
    return state, metrics

  return step


def _project_inference_step(config):
  """The benchmark job's jitted inference forward pass, as a closure."""
  import jax

  from vit_jax.jobs import benchmark

  model, variables, images = benchmark.inference_setup(config)
  infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return lambda: infer(variables, images)


def project_worker():
  """This project's step, one per 'step' line of stdin (see timm_worker).

  Prints 'ready DTYPE' once warm, and its peak host memory at the end.
  """
  # Imported here: the driver runs without jax or the repository's modules.
  sys.path.insert(0, REPO)
  import jax

  from vit_jax.analysis import measure

  config = shared.project_config(_OVERRIDES.value)
  make = _project_train_step if _MODE.value == 'train' else (
    _project_inference_step
  )  # fmt: skip
  step = make(config)
  for _ in range(2):
    jax.block_until_ready(step())
  print(f'ready {config.model.dtype}', flush=True)
  for line in sys.stdin:
    if line.strip() != 'step':
      break
    start = time.perf_counter()
    jax.block_until_ready(step())
    print(time.perf_counter() - start, flush=True)
  print(f'peak_bytes {measure.host_memory_peak_bytes()}', flush=True)


class Worker:
  """A worker process, driven over its stdin and stdout."""

  def __init__(self, name: str, command: list[str], env=None):
    self.name = name
    self.process = subprocess.Popen(
      command,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
      env=env,
      cwd=REPO,
    )
    self.times: list[float] = []
    self.dtype = ''
    self.peak_bytes: int | None = None

  def wait_ready(self):
    for line in self.process.stdout:
      if line.startswith('ready'):
        self.dtype = line.split()[1]
        return
    raise RuntimeError(f'Worker {self.name} exited before it was ready.')

  def step(self):
    self.process.stdin.write('step\n')
    self.process.stdin.flush()
    self.times.append(float(self.process.stdout.readline()))

  def close(self):
    self.process.stdin.close()
    for line in self.process.stdout:
      if line.startswith('peak_bytes'):
        self.peak_bytes = int(line.split()[1])
    self.process.wait(timeout=60)


def _workers() -> list[Worker]:
  common = [f'--model={shared.MODEL.value}', f'--batch={shared.BATCH.value}',
            f'--res={shared.RES.value}', f'--mode={_MODE.value}']  # fmt: skip
  workers = []
  for setting in _SETTINGS.value.split(';'):
    env, overrides = shared.split_setting(setting)
    workers.append(
      Worker(
        f'this project {setting}',
        [
          sys.executable,
          os.path.abspath(__file__),
          '--worker=project',
          f'--overrides={",".join(overrides)}',
          *common,
        ],
        env={**os.environ, **env},
      )
    )
  timm_env = dict(os.environ)
  timm_env['PYTHONPATH'] = shared.TIMM_PYTHONPATH.value
  for dtype in _TIMM_DTYPES.value:
    workers.append(
      Worker(
        f'timm {dtype}',
        [
          shared.TIMM_PYTHON.value,
          os.path.join(REPO, 'benchmarks', 'timm_worker.py'),
          f'--model={shared.TIMM_MODEL.value}',
          f'--dtype={dtype}',
          f'--device={_TIMM_DEVICE.value}',
          *(['--compile'] if _TIMM_COMPILE.value else []),
          *common[1:],
        ],
        env=timm_env,
      )
    )
  return workers


def _ratio(worker, reference) -> str:
  """How much faster `worker` ran: the median of the per-round ratios."""
  if reference is None or reference is worker:
    return '-'
  ratio = statistics.median(
    theirs / ours
    for ours, theirs in zip(worker.times, reference.times, strict=True)
  )
  return f'{ratio:.2f}x'


def main(argv):
  del argv
  if _WORKER.value == 'project':
    project_worker()
    return
  workers = _workers()
  try:
    for worker in workers:
      worker.wait_ready()
    loads = []
    for _ in range(_STEPS.value):
      for worker in workers:
        worker.step()
      loads.append(os.getloadavg()[0])
  finally:
    for worker in workers:
      worker.close()
  batch = shared.BATCH.value
  timm = {w.name.split()[-1]: w for w in workers if w.name.startswith('timm')}
  first = workers[0]  # This project's first setting.
  lines = [
    f'| {shared.MODEL.value} {_MODE.value}, batch {batch}, {shared.RES.value} px | '
    'img/s median | '
    'min-max | vs timm, same dtype | vs the first setting | peak host GiB |',
    '|---|---|---|---|---|---|',
  ]
  for worker in workers:
    rates = [batch / t for t in worker.times]
    reference = timm.get(_TIMM_DTYPES_OF.get(worker.dtype, ''))
    ratio = _ratio(worker, reference)
    if worker.name.startswith('timm'):
      against_first = '-'
    else:
      against_first = _ratio(worker, first)
    memory = '-' if worker.peak_bytes is None else (
      f'{worker.peak_bytes / 2**30:.2f}'
    )  # fmt: skip
    lines.append(
      f'| {worker.name} | {statistics.median(rates):.2f} | '
      f'{min(rates):.2f}-{max(rates):.2f} | {ratio} | {against_first} | '
      f'{memory} |'
    )
  # Other processes' load slows timm's threads (which wait for each other)
  # more than XLA's: a run whose load exceeds the cores says little.
  lines.append(
    f'\nLoad average (1 min) during the run: {min(loads):.1f}-'
    f'{max(loads):.1f} on {os.cpu_count()} cores.'
  )
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)

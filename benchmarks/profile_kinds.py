"""Where a step's time goes, per kind of work, here and in timm.

Profiles this project's training step or inference forward pass (the
benchmark job's, as benchmarks/interleave.py runs it) with `jax.profiler`,
and timm's with `torch.profiler`, each in its own process, and prints one
Markdown table of milliseconds per step for each kind of work: the dense
products, attention, GELU, LayerNorm, casts, copies and transposes,
reductions, other element-wise work, the patch embedding, and the wall
time. XLA's operations are classified by what their HLO computes (a fusion
by the operations inside it); torch's by operator name. XLA's executor may
run two operations at once: each moment of its profile is split evenly
among the operations running then, so that its column adds up to the time
some operation was running ('busy'). 'untraced' is the rest of the wall
time (both are means over the profiled steps): on a CPU mostly the float32
products that XLA hands to Eigen, which finish on Eigen's threads after
their own events end; where another operation runs beside them, their
work can show up in its time instead.

  python benchmarks/profile_kinds.py --mode=inference \\
    --settings=model.dtype=bfloat16,benchmark.inference_kernel_dtype=bfloat16 \\
    --timm_dtype=bf16 --timm_pythonpath=DIR_WITH_TORCHVISION_STUB

timm runs in its own environment (see benchmarks/interleave.py), through
benchmarks/timm_worker.py --profile_steps.
"""

import collections
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import shared
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STEPS = flags.DEFINE_integer('steps', 3, 'Profiled steps (after 2 warm).')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'inference'], 'What.')
_SETTINGS = flags.DEFINE_list(
  'settings', ['model.dtype=bfloat16'], "This project's config overrides."
)
_TIMM_DTYPE = flags.DEFINE_enum(
  'timm_dtype',
  'bf16',
  ['', 'bf16', 'bf16w', 'fp32'],
  "timm's dtype ('': none).",
)

KINDS = (
  'dense products',
  'attention',
  'GELU',
  'LayerNorm',
  'casts',
  'copies and transposes',
  'reductions',
  'element-wise',
  'patch embedding',
  'other',
)


def _computations(hlo: str) -> dict[str, str]:
  """The body of each computation of an HLO module's text, by name."""
  bodies, name, lines = {}, None, []
  for line in hlo.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header:
      name, lines = header.group(1), []
    elif line.startswith('}') and name:
      bodies[name] = '\n'.join(lines)
      name = None
    elif name:
      lines.append(line)
  return bodies


def _instructions(hlo: str) -> dict[str, str]:
  """What each instruction computes, by name: its line and called bodies."""
  bodies = _computations(hlo)
  found = {}
  for body in bodies.values():
    for line in body.splitlines():
      match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ', line)
      if not match:
        continue
      called = re.findall(r'calls=%?([\w.\-]+)', line)
      found[match.group(1)] = '\n'.join(
        [line, *(bodies.get(c, '') for c in called)]
      )
  return found


def classify_hlo(text: str) -> str:
  """The kind of work of one XLA operation, from its HLO."""
  if 'onednn_attention' in text:
    return 'attention'
  # The patch embedding runs as a product on CPUs: named by its module.
  if 'convolution(' in text or '/embedding/' in text:
    return 'patch embedding'
  if any(call in text for call in ('onednn_matmul', 'mkl_gemm', ' dot(')):
    # Attention's own products ('product' and 'xla' attention) contract
    # four-dimensional (batch, heads, tokens, head_dim) operands.
    if re.search(r'dot\(\w+\[\d+,\d+,\d+,\d+\]', text) or 'exponential' in text:
      return 'attention'
    return 'dense products'
  if 'tanh(' in text or 'erf(' in text:
    return 'GELU'
  if 'rsqrt(' in text:
    return 'LayerNorm'
  if ' reduce(' in text:
    return 'reductions'
  ops = set(re.findall(r'= \w+\[[^\]]*\][^ ]* (\w+)\(', text))
  # 'fusion' is the instruction's own line; its body says what it computes.
  ops -= {'fusion', 'parameter', 'constant', 'bitcast', 'tuple'}
  if ops and ops <= {'convert'}:
    return 'casts'
  if ops and ops <= {'copy', 'transpose', 'convert', 'slice', 'concatenate'}:
    return 'copies and transposes'
  if ops:
    return 'element-wise'
  return 'other'


def attribute(events: list[tuple[str, float, float]]) -> dict[str, float]:
  """Each label's share of the time, from (label, start, duration) events.

  Every moment is split evenly among the events running then, so that
  operations that ran at once, each on part of the CPU, are not counted
  twice: the shares add up to the time during which anything ran.
  """
  boundaries = []
  for label, start, duration in events:
    boundaries.append((start, 1, label))
    boundaries.append((start + duration, -1, label))
  # Ends before starts at the same moment, so back-to-back events never overlap.
  boundaries.sort(key=lambda b: (b[0], b[1]))
  running = collections.Counter()
  shares = collections.Counter()
  previous = None
  for moment, change, label in boundaries:
    count = sum(running.values())
    if count:
      for name, n in running.items():
        shares[name] += (moment - previous) * n / count
    running[label] += change
    if not running[label]:
      del running[label]
    previous = moment
  return dict(shares)


def _trace_events(directory: str) -> list[dict]:
  (path,) = glob.glob(f'{directory}/**/*.trace.json.gz', recursive=True)
  with gzip.open(path) as f:
    return json.load(f)['traceEvents']


def project_profile(overrides: list[str]) -> dict[str, float]:
  """ms per step of each kind of work, and the wall time, for this project."""
  # Imported here: timm's process runs without jax or the project.
  sys.path.insert(0, REPO)
  import jax

  from vit_jax.jobs import benchmark

  config = shared.project_config(overrides)
  if _MODE.value == 'train':
    setup = benchmark.build(config)
    state = setup.new_state()
    hlo = setup.train_step.as_text()

    def step():
      nonlocal state
      state, _ = setup.train_step(state, setup.batch)
      return state

  else:
    model, variables, images = benchmark.inference_setup(config)
    infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
    compiled = infer.lower(variables, images).compile()
    hlo = compiled.as_text()

    def step():
      return compiled(variables, images)

  for _ in range(2):
    jax.block_until_ready(step())
  kinds_of = {
    name: classify_hlo(text) for name, text in _instructions(hlo).items()
  }
  with tempfile.TemporaryDirectory() as directory:
    walls = []
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      for _ in range(_STEPS.value):
        start = time.perf_counter()
        jax.block_until_ready(step())
        walls.append(time.perf_counter() - start)
    events = _trace_events(directory)
  totals = attribute(
    [
      (kinds_of[event['name']], event['ts'], event['dur'])
      for event in events
      if event.get('ph') == 'X' and event.get('name') in kinds_of
    ]
  )
  result = {k: v / 1e3 / _STEPS.value for k, v in totals.items()}  # us -> ms
  result['wall'] = statistics.mean(walls) * 1e3
  return result


def main(argv):
  del argv
  ours = project_profile(_SETTINGS.value)
  theirs = {}
  if _TIMM_DTYPE.value:
    env = dict(os.environ)
    if shared.TIMM_PYTHONPATH.value:
      env['PYTHONPATH'] = shared.TIMM_PYTHONPATH.value
    worker = os.path.join(os.path.dirname(__file__), 'timm_worker.py')
    output = subprocess.run(
      [
        shared.TIMM_PYTHON.value,
        worker,
        f'--model={shared.TIMM_MODEL.value}',
        f'--batch={shared.BATCH.value}',
        f'--res={shared.RES.value}',
        f'--mode={_MODE.value}',
        f'--dtype={_TIMM_DTYPE.value}',
        f'--profile_steps={_STEPS.value}',
      ],
      capture_output=True,
      text=True,
      check=True,
      env=env,
    ).stdout
    theirs = json.loads(output.strip().splitlines()[-1])
  print(
    f'| {shared.MODEL.value} {_MODE.value}, batch {shared.BATCH.value}, {shared.RES.value} px, '
    f'ms per step | this project ({",".join(_SETTINGS.value)}) | '
    f'timm {_TIMM_DTYPE.value} |'
  )
  print('|---|---|---|')
  for side in (ours, theirs):
    if side:
      side['busy'] = sum(side.get(kind, 0.0) for kind in KINDS)
      side['untraced'] = max(side['wall'] - side['busy'], 0.0)
  for kind in (*KINDS, 'busy', 'untraced', 'wall'):
    if kind in ours or kind in theirs:
      cells = [
        f'{side[kind]:,.0f}' if kind in side else '-' for side in (ours, theirs)
      ]
      print(f'| {kind} | {cells[0]} | {cells[1]} |')


if __name__ == '__main__':
  app.run(main)

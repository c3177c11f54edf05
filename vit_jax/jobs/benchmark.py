"""Training and inference throughput of a model on this machine.

  python main.py --config=configs/benchmark.py:ViT-B_16 --workdir=DIR

Builds the project's real training step (`steps.make_train_step`, with the
config's optimizer: SGD with momentum by default) on random images and
labels already on the devices, compiles it (timing the compilation and
noting whether the persistent compilation cache served it), runs warm-up
steps and then times `benchmark.steps` steps one by one; then the same for
the inference forward pass (with `benchmark.inference_kernel_dtype=bfloat16`
on kernels cast once beforehand, see `common.cast_kernels`). A large matmul in the compute dtype with float32
accumulation, timed in the same run, gives the peak that MFU is taken
against. Prints a table and writes `benchmark.json` to the workdir.

Model FLOPs are the analytic count of `vit_jax.analysis.flops.forward_flops` (matmul
and convolution multiply-adds, 2 FLOPs each), 3x forward for a training
step, whatever rematerialisation recomputes.
"""

import dataclasses
import functools
import statistics
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from vit_jax import objectives, sharding, steps, train_state
from vit_jax import training as training_lib
from vit_jax import workdir as workdir_lib
from vit_jax.analysis import flops, measure
from vit_jax.models import common


def _random_batch(config, mesh, num_classes: int) -> dict[str, jax.Array]:
  """Images uniform in [-1, 1] and one-hot random labels, on the devices."""
  shape = (config.batch_size, config.image_size, config.image_size, 3)

  @jax.jit
  def make(key):
    image_key, label_key = jax.random.split(key)
    return {
      'images': jax.random.uniform(image_key, shape, minval=-1, maxval=1),
      'labels': jax.nn.one_hot(
        jax.random.randint(label_key, (shape[0],), 0, num_classes),
        num_classes,
      ),
    }

  batch = make(jax.random.key(config.seed))
  return jax.device_put(batch, sharding.batch_sharding(mesh))


def _host_to_device_seconds(batch, mesh, repeats: int = 3) -> float:
  """Median time to put a host copy of `batch` on the devices."""
  host = jax.device_get(batch)
  batch_sharding = sharding.batch_sharding(mesh)
  return statistics.median(
    measure.time_calls(
      lambda: jax.device_put(host, batch_sharding), warmup=1, repeats=repeats
    )
  )


def _run_steps(config, setup: 'Setup', profile_dir: str | None):
  """Times training steps then inference; returns their results.

  The state lives (and is donated from step to step) only in here, so its
  buffers are released before the peak matmul runs.
  """
  bench = config.benchmark
  state = setup.new_state()
  metrics = {}

  def train_step():
    nonlocal state, metrics
    state, metrics = setup.train_step(state, setup.batch)
    return state, metrics

  batch_size = config.batch_size
  forward = setup.forward_flops * batch_size
  times = measure.time_calls(train_step, bench.warmup_steps, bench.steps)
  train = measure.rates(
    times, batch_size, flops.TRAINING_FLOPS_PER_FORWARD * forward
  )
  train['final_loss'] = float(metrics['train_loss'])
  if bench.profile_steps and profile_dir:
    with jax.profiler.trace(profile_dir):
      measure.time_calls(train_step, 0, bench.profile_steps)

  # The variables keep the state's shardings.
  variables = _inference_variables(config, state.variables())
  infer = jax.jit(lambda v, images: setup.model.apply(v, images, train=False))
  images = setup.batch['images']
  infer_times = measure.time_calls(
    lambda: infer(variables, images), bench.warmup_steps, bench.steps
  )
  return {
    'train': train,
    'inference': measure.rates(infer_times, batch_size, forward),
    'host_to_device_s': _host_to_device_seconds(setup.batch, setup.mesh),
  }


def _inference_variables(config, variables):
  """The variables inference runs with: kernels cast once if so configured."""
  kernel_dtype = config.benchmark.get('inference_kernel_dtype', '')
  if not kernel_dtype:
    return variables
  return jax.jit(functools.partial(common.cast_kernels, dtype=kernel_dtype))(
    variables
  )


def inference_setup(config: ml_collections.ConfigDict):
  """The model, random variables and images for timing inference alone.

  No training step is built: for comparing forward passes (e.g.
  benchmarks/interleave.py --mode=inference) without its compilation.
  Returns (model, variables, images) on the default device.
  """
  model, _ = objectives.model_from_config(config, config.num_classes)
  mesh = sharding.create_mesh(1, 1, jax.devices()[:1])
  images = _random_batch(config, mesh, config.num_classes)['images']
  init = jax.jit(lambda key: model.init(key, images, train=False))
  variables = nn.meta.unbox(init(jax.random.key(config.seed)))
  return model, _inference_variables(config, variables), images


@dataclasses.dataclass
class Setup:
  """A compiled training step and what it runs on.

  Attributes:
    model: the Flax module.
    mesh: the device mesh.
    layout: the training state's shapes and shardings.
    batch: random images and labels on the devices.
    train_step: the compiled `(state, batch) -> (state, metrics)`.
    compile_info: lowering and compilation seconds, and whether the
      persistent compilation cache served or stored the program.
    forward_flops: analytic forward FLOPs per image.
    new_state: returns a fresh random training state.
  """

  model: Any
  mesh: Mesh
  layout: train_state.StateLayout
  batch: dict[str, jax.Array]
  train_step: Callable
  compile_info: dict[str, Any]
  forward_flops: int
  new_state: Callable[[], train_state.TrainState]


def build(config: ml_collections.ConfigDict) -> Setup:
  """Builds and compiles the project's training step for `config`.

  The optimizer, state layout and step are the training loop's
  (`training.build_training`); only the data differ (random, on the devices).
  """
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.model)
  model, description = objectives.model_from_config(config, config.num_classes)
  task = objectives.Task(
    model=model, loss_fn=steps.get_loss(config.loss), description=description
  )
  with sharding.activation_sharding(mesh, config.sharding):
    training = training_lib.build_training(
      config, task, mesh, config.benchmark.steps + 1
    )
    batch = _random_batch(config, mesh, config.num_classes)
    compiled, compile_info = measure.compile_timed(
      training.train_step, training.layout, batch
    )

  def new_state():
    with sharding.activation_sharding(mesh, config.sharding):
      return training.new_state(config.seed)

  return Setup(
    model=model,
    mesh=mesh,
    layout=training.layout,
    batch=batch,
    train_step=compiled,
    compile_info=compile_info,
    forward_flops=flops.forward_flops(
      config.model_name,
      config.image_size,
      config.num_classes,
      **description.overrides,
    ),
    new_state=new_state,
  )


GLIBC_MALLOC_HINT = (
  "On glibc's malloc XLA:CPU faults its step buffers in anew every step; "
  'with tcmalloc (`apt install libtcmalloc-minimal4`, then run with '
  'LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4) ViT-B/16 '
  'training ran 1.20-1.28x faster at batch 8, 1.62x at batch 32. With '
  'nothing to install, GLIBC_TUNABLES=glibc.malloc.arena_max=1:'
  'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 keeps '
  'them in glibc (1.09-1.12x at batch 8, 1.32x at batch 32). README, '
  'Performance.'
)


def _matmul(model) -> str:
  """Who ran the encoder's dense products (`common.resolve_matmul`)."""
  option = getattr(model, 'matmul', 'xla')  # BiT ResNets: XLA's always.
  return common.resolve_matmul(option, model.dtype)[0]


def _attention(model) -> str | None:
  """The attention implementation that ran; None for the BiT ResNets."""
  if not hasattr(model, 'resolved_attention'):
    return None
  return model.resolved_attention()[0]


def _describe(config, setup: Setup, results, peak, host_baseline) -> dict:
  """The results with what was run, where, and the memory it took."""
  bench = config.benchmark
  devices = setup.mesh.devices.flatten().tolist()
  params = jax.tree.leaves(setup.layout.abstract.params)
  return dict(
    results,
    model=config.model_name,
    image_size=config.image_size,
    batch_size=config.batch_size,
    num_classes=config.num_classes,
    dtype=config.model.dtype,
    matmul=_matmul(setup.model),
    attention=_attention(setup.model),
    scan=bool(config.model.scan),
    remat_policy=config.model.remat_policy,
    sharding=config.sharding,
    mesh=dict(setup.mesh.shape),
    step=config.step,
    optimizer=config.optimizer.name,
    ema_decay=config.ema_decay,
    params=int(sum(np.prod(x.shape) for x in params)),
    forward_flops_per_image=setup.forward_flops,
    peak={
      'flops_per_s': peak,
      'matmul_size': bench.peak_matmul_size,
      'dtype': config.model.dtype,
    },
    memory={
      'host_peak_bytes': measure.host_memory_peak_bytes(),
      'host_baseline_bytes': host_baseline,
      'device': measure.device_memory(devices),
      'step_bytes': measure.step_memory(setup.train_step),
    },
    backend=jax.default_backend(),
    host_allocator=measure.host_allocator(),
    device_kind=devices[0].device_kind,
    device_count=len(devices),
    process_count=jax.process_count(),
    jax_version=jax.__version__,
  )


def run_benchmark(
  config: ml_collections.ConfigDict, profile_dir: str | None = None
) -> dict[str, Any]:
  """Runs the benchmark of `config`; returns the results (see module doc).

  Args:
    config: a benchmark config (configs/benchmark.py).
    profile_dir: where a `jax.profiler` trace of `benchmark.profile_steps`
      extra training steps goes, if any.
  """
  bench = config.benchmark
  host_baseline = measure.host_memory_peak_bytes()
  setup = build(config)
  results: dict[str, Any] = {
    'compile': setup.compile_info,
    'train': None,
    'inference': None,
    'host_to_device_s': None,
  }
  peak = None
  if not bench.compile_only:
    results.update(_run_steps(config, setup, profile_dir))
    peak = measure.matmul_peak(
      config.model.dtype, bench.peak_matmul_size, setup.mesh
    )
    for key in ('train', 'inference'):
      results[key]['mfu'] = results[key]['model_flops_per_s'] / peak

  return _describe(config, setup, results, peak, host_baseline)


def _fmt_rate(rates: dict[str, float]) -> str:
  return f'{rates["median"]:.3g} ({rates["min"]:.3g}-{rates["max"]:.3g})'


def format_table(results: dict[str, Any]) -> str:
  """The results as a small plain-text table."""
  rows = [
    ('model', f'{results["model"]} {results["image_size"]}px, batch '
              f'{results["batch_size"]}, {results["dtype"]}, matmul='
              f'{results["matmul"]}, attention={results["attention"]}, '
              f'scan={results["scan"]}, '
              f'remat={results["remat_policy"]}'),
    ('devices', f'{results["device_count"]} x {results["device_kind"]} '
                f'({results["backend"]}), {results["sharding"]} '
                f'mesh {results["mesh"]}'),
    ('compile', f'{results["compile"]["total_s"]:.1f} s (cache hit: '
                f'{results["compile"]["cache_hit"]})'),
  ]  # fmt: skip
  for key in ('train', 'inference'):
    if results[key]:
      r = results[key]
      rows.append((
        f'{key} img/s',
        f'{_fmt_rate(r["images_per_s"])}, '
        f'{r["model_flops_per_s"] / 1e9:.1f} GFLOP/s, MFU {r["mfu"]:.1%}',
      ))  # fmt: skip
  if results['peak']['flops_per_s']:
    rows.append((
      'peak', f'{results["peak"]["flops_per_s"] / 1e9:.1f} GFLOP/s '
              f'({results["peak"]["matmul_size"]}^3 {results["dtype"]})',
    ))  # fmt: skip
  memory = results['memory']
  if memory['step_bytes']['total'] is not None:
    rows.append((
      'step memory', f'{memory["step_bytes"]["total"] / 2**20:,.1f} MiB '
                     "(XLA's buffers for the training step, per device)",
    ))  # fmt: skip
  rows.append((
    'host memory', f'{memory["host_peak_bytes"] / 2**30:.2f} GiB peak, '
                   f'{results["host_allocator"] or "unknown"} malloc',
  ))  # fmt: skip
  if memory['device']['peak_bytes'] is not None:
    rows.append((
      'device memory', f'{memory["device"]["peak_bytes"] / 2**30:.2f} GiB peak'
    ))  # fmt: skip
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The `benchmark` job: runs, prints the table, writes benchmark.json."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  results = run_benchmark(config, profile_dir=str(workdir / 'profile'))
  if results['backend'] == 'cpu' and results['host_allocator'] == 'glibc':
    logging.info('%s', GLIBC_MALLOC_HINT)
  table = format_table(results)
  if jax.process_index() == 0:
    print(table, flush=True)
  workdir_lib.write_json(workdir, 'benchmark.json', results)
  return results

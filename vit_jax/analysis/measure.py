"""Measuring a program on this machine: time, throughput, memory, compiles.

What the benchmark job reports, usable on its own: `time_calls` times a
function call by call (after warm-up), `rates` turns step times into
images/s and FLOP/s, `matmul_peak` gives the matmul FLOP/s the model's are
compared with, `compile_timed` compiles a step and says whether the
persistent compilation cache served it, and `step_memory`,
`host_memory_peak_bytes` and `device_memory` say how much memory it takes,
and `host_allocator` which malloc the process runs on.
"""

import pathlib
import re
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_CACHE_HIT = '/jax/compilation_cache/cache_hits'
# Recorded when a compiled program is written to the persistent cache.
_CACHE_WRITE = '/jax/compilation_cache/cache_misses'


def host_memory_peak_bytes() -> int:
  """Peak resident memory of this process so far (Linux: ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Shared libraries that replace glibc's malloc when preloaded or linked.
_ALLOCATORS = ('tcmalloc', 'jemalloc', 'mimalloc')


def host_allocator(maps: pathlib.Path = pathlib.Path('/proc/self/maps')) -> str:
  """Which malloc this process runs on, from the libraries it has mapped.

  'tcmalloc', 'jemalloc' or 'mimalloc' where one is loaded (preloaded or
  linked), 'glibc' where none is, '' where `maps` cannot be read (not
  Linux). It matters on CPUs: glibc's malloc hands XLA:CPU's large step
  buffers back to the kernel when freed, so every step faults their pages
  in anew (some 277,000 page faults and 0.47 s of system time per ViT-B/16
  bfloat16 training step, batch 8); tcmalloc keeps them (README,
  Performance).
  """
  try:
    text = maps.read_text()
  except OSError:
    return ''
  for name in _ALLOCATORS:
    if re.search(rf'/lib{name}[\w.\-]*\.so', text):
      return name
  return 'glibc'


def device_memory(devices) -> dict[str, int | None]:
  """Peak device memory (total and largest per device) and its limit.

  Accelerators report `memory_stats()`; the CPU backend returns None, and
  every value is None then.
  """
  peaks, limits = [], []
  for device in devices:
    stats = device.memory_stats()
    if not stats:
      return dict.fromkeys(('peak_bytes', 'max_device_peak_bytes',
                            'limit_bytes'))  # fmt: skip
    peaks.append(stats.get('peak_bytes_in_use', stats.get('bytes_in_use', 0)))
    limits.append(stats.get('bytes_limit', 0))
  return {
    'peak_bytes': sum(peaks),
    'max_device_peak_bytes': max(peaks),
    'limit_bytes': sum(limits) or None,
  }


def summary(values: list[float]) -> dict[str, float]:
  return {
    'median': statistics.median(values),
    'min': min(values),
    'max': max(values),
  }


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
  """Seconds of `repeats` calls of `fn`, each waited for, after `warmup`."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def matmul_peak(dtype: str, size: int, mesh, repeats: int = 5) -> float:
  """FLOP/s of the fastest of `repeats` (size x size) matmuls per device.

  One matmul per device, with `dtype` operands and float32 accumulation
  (`preferred_element_type`), the way the models compute.
  """
  num = mesh.devices.size
  spec = NamedSharding(mesh, P(tuple(mesh.axis_names)))

  @jax.jit
  def operands(key):
    a, b = jax.random.normal(key, (2, num, size, size), jnp.float32)
    return jax.lax.with_sharding_constraint(
      (a.astype(dtype), b.astype(dtype)), spec
    )

  matmul = jax.jit(
    lambda a, b: jnp.einsum(
      'nij,njk->nik', a, b, preferred_element_type=jnp.float32
    ),
    out_shardings=spec,
  )
  a, b = operands(jax.random.key(0))
  best = min(time_calls(lambda: matmul(a, b), warmup=1, repeats=repeats))
  return 2 * num * size**3 / best


class CacheEvents:
  """Counts persistent compilation cache hits and writes while active."""

  def __init__(self):
    self.hits = self.writes = 0

  def __call__(self, event: str, **kwargs):
    del kwargs
    if event == _CACHE_HIT:
      self.hits += 1
    elif event == _CACHE_WRITE:
      self.writes += 1

  def __enter__(self):
    jax.monitoring.register_event_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_listener(self)


def rates(times: list[float], batch_size: int, flops_per_step: float):
  images = [batch_size / t for t in times]
  return {
    'images_per_s': summary(images),
    'step_s': summary(times),
    'flops_per_step': flops_per_step,
    'model_flops_per_s': flops_per_step / statistics.median(times),
  }


def compile_timed(train_step, layout, batch) -> tuple[Any, dict[str, Any]]:
  """Compiles the train step; returns it and the compilation's facts."""
  with CacheEvents() as cache:
    start = time.perf_counter()
    lowered = train_step.lower(layout.abstract, batch)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
  return compiled, {
    'lower_s': lower_s,
    'compile_s': compile_s,
    'total_s': lower_s + compile_s,
    'cache_dir': jax.config.jax_compilation_cache_dir,
    'cache_hit': cache.hits > 0,
    'cache_written': cache.writes > 0,
  }


def step_memory(compiled) -> dict[str, int | None]:
  """XLA's buffer assignment of a compiled step, per device, in bytes.

  Arguments (the state and batch), outputs, temporaries (activations kept
  for the backward pass among them) and the outputs that reuse donated
  arguments; `total` is what the step needs at once: arguments + outputs +
  temporaries - aliased. Known for every backend, unlike device memory
  statistics, and without the compiler's own memory that the process peak
  includes.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return dict.fromkeys(('argument', 'output', 'temp', 'alias', 'total'))
  sizes = {
    'argument': stats.argument_size_in_bytes,
    'output': stats.output_size_in_bytes,
    'temp': stats.temp_size_in_bytes,
    'alias': stats.alias_size_in_bytes,
  }
  sizes['total'] = (
    sizes['argument'] + sizes['output'] + sizes['temp'] - sizes['alias']
  )
  return sizes

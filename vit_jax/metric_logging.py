"""Metrics to the console, TensorBoard and a JSON-lines file.

Only process 0 writes. `metrics.jsonl` in the workdir holds one object per
logged step, e.g. {"step": 100, "train_loss": 0.41, "learning_rate": 0.001};
TensorBoard event files go to the same workdir.
"""

import json
import time
from typing import Any

import jax
from absl import logging
from clu import metric_writers
from etils import epath


def _format_duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return (
    f'{hours}:{minutes:02d}:{seconds:02d}'
    if hours
    else f'{minutes}:{seconds:02d}'
  )


class MetricLogger:
  """Writes scalars of a run; also measures throughput between logs."""

  def __init__(self, workdir: str, total_steps: int, global_batch: int):
    self._is_writer = jax.process_index() == 0
    self._total_steps = total_steps
    self._global_batch = global_batch
    self._num_devices = jax.device_count()
    self._last_time = time.perf_counter()
    self._last_step: int | None = None
    self._jsonl = epath.Path(workdir) / 'metrics.jsonl'
    self._writer = (
      metric_writers.SummaryWriter(workdir) if self._is_writer else None
    )

  def start(self, step: int) -> None:
    """Marks the start of timed training at `step` (after a resume too)."""
    self._last_step = step
    self._last_time = time.perf_counter()

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Logs scalars at `step` (to TensorBoard and the JSON-lines file)."""
    scalars = {k: float(v) for k, v in metrics.items()}
    if self._is_writer:
      self._writer.write_scalars(step, scalars)
      with self._jsonl.open('a') as f:
        f.write(json.dumps({'step': step, **scalars}) + '\n')

  def progress(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
    """Logs training metrics with throughput and a console progress line.

    Returns the metrics with the throughput added.
    """
    now = time.perf_counter()
    steps = step - (self._last_step if self._last_step is not None else step)
    elapsed = now - self._last_time
    self._last_step, self._last_time = step, now
    metrics = {k: float(v) for k, v in metrics.items()}
    if steps > 0 and elapsed > 0:
      images_per_s = steps * self._global_batch / elapsed
      metrics['images_per_s_per_device'] = images_per_s / self._num_devices
      eta = (self._total_steps - step) * elapsed / steps
      eta_text = _format_duration(eta)
    else:
      eta_text = '?'
    self.write(step, metrics)
    parts = [f'step {step}/{self._total_steps}']
    parts += [
      f'{key} {value:.4g}'
      for key, value in metrics.items()
      if key != 'images_per_s_per_device'
    ]
    if 'images_per_s_per_device' in metrics:
      parts.append(f'{metrics["images_per_s_per_device"]:.3g} img/s/device')
    parts.append(f'ETA {eta_text}')
    logging.info(' | '.join(parts))
    return metrics

  def log(self, step: int, metrics: dict[str, Any]) -> None:
    """Writes metrics (e.g. evaluations) and prints them."""
    self.write(step, metrics)
    logging.info(
      'step %d | %s',
      step,
      ' | '.join(f'{k} {float(v):.4g}' for k, v in metrics.items()),
    )

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()


class _DropLibraryInfo(logging.logging.Filter):
  """Drops INFO records of libraries that log every checkpoint operation."""

  def filter(self, record):
    noisy = any(f'/{lib}/' in record.pathname for lib in _NOISY_LIBRARIES)
    return record.levelno >= logging.logging.WARNING or not noisy


_NOISY_LIBRARIES = ('orbax', 'clu')


def quiet_library_logs() -> None:
  """Keeps the console to this project's progress lines and warnings."""
  logging.get_absl_handler().addFilter(_DropLibraryInfo())

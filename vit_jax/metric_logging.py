"""Metrics to the console, TensorBoard and a JSON-lines file.

Only process 0 writes. `metrics.jsonl` in the workdir holds one object per
logged step, e.g. {"step": 100, "train_loss": 0.41, "learning_rate": 0.001};
TensorBoard event files go to the same workdir. A run resumed from a
checkpoint first drops the records of later steps (written before it was
stopped, and about to be redone), so that both hold what an uninterrupted
run would.
"""

import json
import time
from typing import Any

import jax
import tensorflow as tf
from absl import logging
from clu import metric_writers
from etils import epath
from tensorboard.compat.proto import event_pb2

from vit_jax import workdir as workdir_lib


def _truncate_jsonl(path: epath.Path, last_step: int) -> None:
  """Keeps the records of steps <= last_step (and drops a torn last line)."""
  if not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # Cut short by a kill; never complete.
      continue
    if record['step'] <= last_step:
      kept.append(line)
  if kept != lines:
    workdir_lib.replace_atomically(
      path, lambda tmp: tmp.write_text(''.join(kept))
    )


def _read_records(path: epath.Path) -> list[bytes]:
  records = []
  try:
    for record in tf.data.TFRecordDataset(str(path)):
      records.append(record.numpy())
  except tf.errors.DataLossError:  # A last record cut short by a kill.
    pass
  return records


def _truncate_events(workdir: epath.Path, last_step: int) -> None:
  """Keeps the TensorBoard events of steps <= last_step."""
  for path in workdir.glob('events.out.tfevents.*'):
    records = _read_records(path)
    kept = [
      r for r in records if event_pb2.Event.FromString(r).step <= last_step
    ]
    # A TFRecord is its bytes and 16 of framing; more is a torn record.
    intact = path.stat().length == sum(len(r) + 16 for r in records)
    if len(kept) == len(records) and intact:
      continue

    def write(tmp, kept=kept):
      with tf.io.TFRecordWriter(str(tmp)) as writer:
        for record in kept:
          writer.write(record)

    workdir_lib.replace_atomically(path, write)


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
    self._workdir = epath.Path(workdir)
    self._jsonl = self._workdir / 'metrics.jsonl'
    self._writer = None

  def start(self, step: int) -> None:
    """Starts logging from `step` (0, or the step a run resumed from).

    Records of later steps, left by a run that was stopped after writing
    them, are dropped first.
    """
    if self._is_writer:
      _truncate_jsonl(self._jsonl, step)
      _truncate_events(self._workdir, step)
      self._writer = metric_writers.SummaryWriter(str(self._workdir))
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

  def flush(self) -> None:
    """Hands buffered TensorBoard events to the OS (a kill keeps them)."""
    if self._writer is not None:
      self._writer.flush()

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

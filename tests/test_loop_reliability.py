"""Faults of a training run: each ends in an exact resume or a clear error.

The subprocess runs go through tests/inject_faults.py, which stops main.py
at exact points (inside a checkpoint save, inside the export, ...).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import inject_faults
import numpy as np
import pytest
import tensorflow as tf
from orbax.checkpoint._src.path import atomicity
from tensorboard.compat.proto import event_pb2

from configs import common
from configs import digits as digits_config
from helpers import COMPILATION_CACHE_FLAG, TINY_DIGITS
from vit_jax import (
  checkpoints,
  config_checks,
  data,
  loop,
  workdir_lock,
)
from vit_jax.jobs import finetune, pretrain

ROOT = Path(__file__).resolve().parents[1]

# A tiny model on 8x8 digits; evaluations and checkpoints mid-run, and
# logging windows that a checkpoint or a SIGTERM can cut.
TINY = {
  **TINY_DIGITS,
  'total_steps': 60,
  'log_every': 5,
  'checkpoint_every': 20,
  'keep_checkpoints': 10,
  'eval_every': 20,
}
# Wall-clock measurements differ between runs of the same steps.
TIMING = 'images_per_s_per_device'


def tiny_config(**overrides):
  config = digits_config.get_config()
  config.update_from_flattened_dict({**TINY, **overrides})
  return config


def run_main(workdir, fault='none', **overrides):
  flags = [f'--config.{k}={v}' for k, v in {**TINY, **overrides}.items()]
  command = [
    sys.executable, str(ROOT / 'tests/inject_faults.py'), fault,
    f'--config={ROOT / "configs/digits.py"}', f'--workdir={workdir}',
    COMPILATION_CACHE_FLAG, *flags,
  ]  # fmt: skip
  return subprocess.run(
    command, capture_output=True, text=True, timeout=300, check=False
  )


def metric_records(workdir):
  lines = (Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  records = [json.loads(line) for line in lines]
  return [{k: v for k, v in r.items() if k != TIMING} for r in records]


def tensorboard_scalars(workdir):
  """(tag, step, value) of every event, in the order they were written."""
  scalars = []
  for path in sorted(Path(workdir).glob('events.out.tfevents.*')):
    for record in tf.data.TFRecordDataset(str(path)):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.tag != TIMING:
          number = float(tf.make_ndarray(value.tensor))
          scalars.append((value.tag, event.step, number))
  return scalars


def workdir_files(workdir):
  """Every file's bytes and modification time."""
  return {
    path: (path.read_bytes(), path.stat().st_mtime_ns)
    for path in Path(workdir).rglob('*')
    if path.is_file()
  }


def checkpoint_steps(workdir):
  store = checkpoints.StateCheckpoints(
    Path(workdir) / 'checkpoints', read_only=True
  )
  try:
    return store.all_steps()
  finally:
    store.close()


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The same run uninterrupted (in this process: the same numbers)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  pretrain.run(tiny_config(), str(workdir))
  return workdir


# SIGTERM, then SIGKILLs at points that matter, each followed by a resume.
FAULTS = (
  'term-at-step:23',  # not a logging step: cuts a logging window
  'kill-in-save:40',
  'kill-in-export',
  'kill-before-results',
  'none',  # finishes
)


@pytest.fixture(scope='module')
def interrupted(tmp_path_factory):
  """A run stopped at every fault in turn; each stop's (status, output)."""
  workdir = tmp_path_factory.mktemp('interrupted')
  stops = {fault: run_main(workdir, fault) for fault in FAULTS}
  return workdir, stops


def test_sigterm_exits_with_status_75_and_says_so(interrupted):  # item 11
  _, stops = interrupted
  stop = stops['term-at-step:23']
  assert stop.returncode == 75, stop.stderr[-3000:]
  assert 'status 75' in stop.stderr and 'at step 23' in stop.stderr
  assert 'Resumed from step 23' in stops['kill-in-save:40'].stderr


def test_sigkills_anywhere_end_like_an_uninterrupted_run(
  interrupted, reference
):
  workdir, stops = interrupted
  for fault in FAULTS[1:-1]:
    assert stops[fault].returncode == -signal.SIGKILL, fault
  # The save of step 40 was killed before its rename: the run after it
  # resumed from step 23.
  assert 'Resumed from step 23' in stops['kill-in-export'].stderr
  assert 'Resumed from step 60' in stops['none'].stderr
  assert stops['none'].returncode == 0, stops['none'].stderr[-3000:]
  expected = json.loads((reference / 'results.json').read_text())
  assert json.loads((workdir / 'results.json').read_text()) == expected
  exported, uninterrupted = (
    np.load(directory / 'model.npz') for directory in (workdir, reference)
  )
  assert sorted(exported.files) == sorted(uninterrupted.files)
  for key in exported.files:
    np.testing.assert_array_equal(exported[key], uninterrupted[key])
  leftovers = [p.name for p in workdir.iterdir() if p.name.endswith('.tmp')]
  assert not leftovers


def test_resumed_logs_hold_one_record_per_logged_step(  # item 7
  interrupted, reference
):
  workdir, _ = interrupted
  records = metric_records(workdir)
  # Equal values also mean that the logging windows cut by the SIGTERM at
  # step 23 and by the checkpoints average the same steps.
  assert records == metric_records(reference)
  logged = [r['step'] for r in records if 'train_loss' in r]
  assert logged == list(range(5, 61, 5))
  assert tensorboard_scalars(workdir) == tensorboard_scalars(reference)


def test_rerunning_a_finished_run_changes_nothing(interrupted):  # item 2
  workdir, _ = interrupted
  before = workdir_files(workdir)
  rerun = run_main(workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'holds a finished run of this config' in rerun.stderr
  assert workdir_files(workdir) == before


def in_process_run(workdir, monkeypatch=None, fault_step=None, sig=None,
                   **overrides):  # fmt: skip
  if fault_step is not None:
    monkeypatch.setattr(
      data.Dataset,
      'train_iter',
      inject_faults.signal_at_step(data.Dataset.train_iter, fault_step, sig),
    )
  return pretrain.run(tiny_config(**overrides), str(workdir))


def test_sigterm_on_a_checkpoint_step_stops_cleanly(tmp_path, monkeypatch):
  # item 1: the regular save of step 20 and the preemption save coincide.
  results = in_process_run(
    tmp_path, monkeypatch, fault_step=20, sig=signal.SIGTERM, eval_every=0
  )
  assert results == {loop.PREEMPTED: 20}
  assert checkpoint_steps(tmp_path) == [20]


def test_a_finished_sweep_rerun_changes_nothing(tmp_path):  # item 2
  config = common.finetune('ViT-Ti_16', 'digits')
  config.update_from_flattened_dict({
    **{k: v for k, v in TINY.items() if k.startswith('model.')},
    'init': finetune.RANDOM_INIT, 'sweep': True, 'lr_grid': (0.01, 0.03),
    'image_size': 8, 'total_steps': 4, 'log_every': 2, 'batch_size': 32,
    'eval_batch_size': 64, 'model.patch_size': 4, 'lr.warmup_steps': 1,
  })  # fmt: skip
  table = finetune.run(config, str(tmp_path))
  before = workdir_files(tmp_path)
  assert finetune.run(config, str(tmp_path)) == table
  assert workdir_files(tmp_path) == before
  # Each finished fine-tune of the sweep on its own, too (the final one
  # exported its model).
  (tmp_path / 'results.json').unlink()
  assert finetune.run(config, str(tmp_path)) == table
  after = workdir_files(tmp_path)
  changed = {p.name for p in before if after.get(p) != before[p]}
  assert changed == {'results.json', 'results.md'}


@pytest.mark.parametrize(
  'key, value',
  [('batch_size', 0), ('checkpoint_every', 0), ('log_every', 0),
   ('total_steps', -5), ('eval_every', -1), ('lr.base', -1.0),
   ('keep_checkpoints', 0), ('label_smoothing', 1.5)],
)  # fmt: skip
def test_invalid_numbers_are_refused_before_any_work(tmp_path, key, value):
  # item 8
  with pytest.raises(config_checks.ConfigError, match=f'config.{key}='):
    pretrain.run(tiny_config(**{key: value}), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_every_problem_is_named_at_once():
  problems = config_checks.problems(
    tiny_config(batch_size=0, log_every=-2, **{'optimizer.b2': 1.0})
  )
  assert problems == [
    'config.batch_size=0 must be a positive integer',
    'config.log_every=-2 must be a positive integer',
    'config.optimizer.b2=1.0 must be in [0, 1)',
  ]


def test_a_refused_run_leaves_the_workdir_config(tmp_path):  # item 10
  in_process_run(tmp_path, total_steps=5, checkpoint_every=5, eval_every=0)
  (tmp_path / 'results.json').unlink()  # as if killed before the end
  recorded = (tmp_path / 'config.json').read_text()
  with pytest.raises(checkpoints.WorkdirMismatchError, match='hidden_size'):
    in_process_run(tmp_path, total_steps=5, **{'model.hidden_size': 16})
  assert (tmp_path / 'config.json').read_text() == recorded


def nonfinite_config(lr):
  config = tiny_config(total_steps=20, checkpoint_every=1, log_every=1)
  config.eval_every = 0
  config.optimizer.name = 'sgd'
  config.optimizer.grad_clip_norm = 0.0
  config.lr.base = lr
  config.lr.warmup_steps = 0
  config.lr.decay = 'constant'
  return config


def assert_only_good_checkpoints_left(workdir, first_bad_loss_step):
  """Finite parameters, whose own loss (the next step's) was finite."""
  store = checkpoints.StateCheckpoints(workdir / 'checkpoints', read_only=True)
  try:
    assert store.all_steps()
    for step in store.all_steps():
      assert step + 1 < first_bad_loss_step, step
      params = store.restore_variables(step)['params']
      for leaf in checkpoints.flatten(params).values():
        assert np.isfinite(leaf).all(), step
  finally:
    store.close()


def test_after_a_nan_loss_only_good_checkpoints_are_left(tmp_path):  # item 5
  with pytest.raises(loop.NonFiniteLossError) as error:
    pretrain.run(nonfinite_config(1e4), str(tmp_path))
  message = str(error.value)
  bad = int(message.split(' at step ')[1].split('.')[0])
  assert bad > 2
  # The checkpoint before the bad step gave that loss: moved aside.
  assert (tmp_path / 'checkpoints' / f'{bad - 1}.diverged').is_dir()
  assert f'the last good checkpoint is step {bad - 2}' in message
  assert_only_good_checkpoints_left(tmp_path, bad)


def test_non_finite_parameters_are_never_saved(tmp_path):  # item 5
  # A learning rate beyond float32 makes the first update infinite while
  # the first loss (of the initial parameters) is finite.
  with pytest.raises(loop.NonFiniteStateError, match='after step 1 are not'):
    pretrain.run(nonfinite_config(1e39), str(tmp_path))
  assert checkpoint_steps(tmp_path) == []


def test_a_failed_save_stops_the_run_at_once_naming_path_and_space(
  tmp_path, monkeypatch
):  # item 12
  rename = atomicity.async_path.rename
  save_failed = threading.Event()

  async def disk_full_from_step_20(source, target, *args, **kwargs):
    if Path(target).name.isdigit() and int(Path(target).name) >= 20:
      save_failed.set()
      raise OSError(errno.ENOSPC, 'No space left on device')
    return await rename(source, target, *args, **kwargs)

  train_iter = data.Dataset.train_iter

  def waiting_for_the_failure(self, start_step, *args, **kwargs):
    # Tiny steps can outrun a save thread starved by a loaded machine: hold
    # the batch of step 150 until the save has failed, and a second more for
    # its thread to end, so that the loop must see the failure on the 50
    # steps before the next save (which would wait for it anyway).
    batches = train_iter(self, start_step, *args, **kwargs)
    for number, batch in enumerate(batches, start_step + 1):
      if number == 150:
        assert save_failed.wait(timeout=120), 'the save of step 100 never ran'
        time.sleep(1)
      yield batch

  monkeypatch.setattr(atomicity.async_path, 'rename', disk_full_from_step_20)
  monkeypatch.setattr(data.Dataset, 'train_iter', waiting_for_the_failure)
  with pytest.raises(checkpoints.CheckpointSaveError) as error:
    in_process_run(
      tmp_path, log_every=1, eval_every=0, total_steps=400,
      checkpoint_every=100,
    )  # fmt: skip
  message = str(error.value)
  assert f'step 100 to {tmp_path / "checkpoints" / "100"}' in message
  assert 'No space left on device' in message and 'MiB free' in message
  assert 'starts again from step 0' in message  # nothing saved before 100
  # Stopped before the next checkpoint step (200), where the manager would
  # wait for the failed save anyway: the failure was seen on a step between.
  assert max(r['step'] for r in metric_records(tmp_path)) < 200


def test_a_second_process_on_a_workdir_fails_at_once(tmp_path):  # item 6
  flags = [
    f'--config.{k}={v}' for k, v in {**TINY, 'total_steps': 10**6}.items()
  ]
  command = [
    sys.executable, str(ROOT / 'main.py'),
    f'--config={ROOT / "configs/digits.py"}', f'--workdir={tmp_path}',
    COMPILATION_CACHE_FLAG, *flags,
  ]  # fmt: skip
  first = subprocess.Popen(
    command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  try:
    lock = tmp_path / workdir_lock.LOCK_FILE
    deadline = time.time() + 120
    while not (lock.exists() and f'pid {first.pid} ' in lock.read_text()):
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.05)
    second = subprocess.run(
      command, capture_output=True, text=True, timeout=120, check=False
    )
    assert second.returncode == 1
    assert f'is in use by pid {first.pid} on host' in second.stderr
    assert first.poll() is None, 'the first run was disturbed'
  finally:
    first.kill()
    first.wait()
  # The kernel released the killed process's lock.
  with workdir_lock.locked(tmp_path):
    assert f'pid {os.getpid()} ' in lock.read_text()

"""Faults at exact points of a run, for the reliability tests.

`python tests/inject_faults.py FAULT [main.py flags]` installs FAULT and
runs main.py; FAULT is one of:
  none                  no fault
  term-at-step:N        SIGTERM while step N runs
  kill-after-step:N     SIGKILL once step N is done (logged, saved)
  kill-in-save:N        SIGKILL while the checkpoint of step N is written:
                        its files are written, its directory not yet renamed
  kill-in-export        SIGKILL once the exported .npz is written beside its
                        destination, before its rename
  kill-before-results   SIGKILL after the export, before results.json
The tests also patch in-process with `signal_at_step`.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def signal_at_step(train_iter, step: int, sig: int):
  """A `Dataset.train_iter` that sends `sig` to this process as the loop
  takes the batch of `step` (so after step - 1 is done)."""

  def patched(self, start_step, *args, **kwargs):
    batches = train_iter(self, start_step, *args, **kwargs)
    for number, batch in enumerate(batches, start_step + 1):
      if number == step:
        os.kill(os.getpid(), sig)
      yield batch

  return patched


def _kill():
  os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_save(step: int):
  from orbax.checkpoint._src.path import atomicity

  rename = atomicity.async_path.rename

  async def killing_rename(source, target, *args, **kwargs):
    if Path(target).name == str(step):
      _kill()
    return await rename(source, target, *args, **kwargs)

  atomicity.async_path.rename = killing_rename


def _kill_in_export():
  import numpy as np

  savez = np.savez

  def killing_savez(file, *args, **kwargs):
    savez(file, *args, **kwargs)
    file.flush()
    _kill()

  np.savez = killing_savez


def _kill_before_results():
  from vit_jax import workdir

  write_json = workdir.write_json

  def killing_write_json(directory, name, value):
    if name == 'results.json':
      _kill()
    return write_json(directory, name, value)

  workdir.write_json = killing_write_json


def install(fault: str) -> None:
  from vit_jax import data

  name, _, step = fault.partition(':')
  if name == 'term-at-step':
    data.Dataset.train_iter = signal_at_step(
      data.Dataset.train_iter, int(step), signal.SIGTERM
    )
  elif name == 'kill-after-step':
    data.Dataset.train_iter = signal_at_step(
      data.Dataset.train_iter, int(step) + 1, signal.SIGKILL
    )
  elif name == 'kill-in-save':
    _kill_in_save(int(step))
  elif name == 'kill-in-export':
    _kill_in_export()
  elif name == 'kill-before-results':
    _kill_before_results()
  elif name != 'none':
    raise ValueError(f'Unknown fault {fault!r}.')


if __name__ == '__main__':
  sys.path.insert(0, str(ROOT))
  install(sys.argv[1])
  sys.argv = [str(ROOT / 'main.py'), *sys.argv[2:]]
  runpy.run_path(str(ROOT / 'main.py'), run_name='__main__')

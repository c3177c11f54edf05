"""Damaged checkpoints: a resume falls back, a read names the file and why."""

import gc
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import digits as digits_config
from helpers import TINY_DIGITS
from vit_jax import checkpoints
from vit_jax.jobs import pretrain
from vit_jax.models.description import DescriptionError

# A tiny model on 8x8 digits, checkpointed at steps 5 and 10.
TINY = {
  **TINY_DIGITS,
  'total_steps': 10,
  'log_every': 5,
  'checkpoint_every': 5,
  'keep_checkpoints': 10,
  'eval_every': 0,
}


def tiny_config():
  config = digits_config.get_config()
  config.update_from_flattened_dict(TINY)
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished workdir, and its results."""
  workdir = tmp_path_factory.mktemp('trained')
  results = pretrain.run(tiny_config(), str(workdir))
  return workdir, results


def killed_copy(trained, tmp_path):
  """The workdir as if killed after its last checkpoint (step 10)."""
  workdir = tmp_path / 'workdir'
  shutil.copytree(trained[0], workdir)
  (workdir / 'results.json').unlink()
  return workdir


def array_files(step_dir: Path) -> list[Path]:
  files = [p for p in (step_dir / 'state').rglob('*') if p.parent.name == 'd']
  assert files, 'no array files: the orbax layout changed'
  return files


def truncate_arrays(step_dir):
  for path in array_files(step_dir):
    os.truncate(path, path.stat().st_size // 2)


def zero_arrays(step_dir):
  for path in array_files(step_dir):
    path.write_bytes(bytes(path.stat().st_size))


DAMAGE = {
  'truncated arrays': truncate_arrays,
  'zeroed arrays': zero_arrays,
  'no _METADATA': lambda step: (step / 'state' / '_METADATA').unlink(),
  'no state': lambda step: shutil.rmtree(step / 'state'),
  'no model description': lambda step: shutil.rmtree(step / 'model'),
}


@pytest.mark.parametrize('damage', DAMAGE)
def test_a_damaged_last_step_is_moved_aside_and_an_older_one_resumes(
  trained, tmp_path, damage, caplog, monkeypatch
):
  unraisable = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  workdir = killed_copy(trained, tmp_path)
  DAMAGE[damage](workdir / 'checkpoints' / '10')
  results = pretrain.run(tiny_config(), str(workdir))
  # Resumed from step 5 and redid steps 6-10 exactly.
  assert results == trained[1]
  moved = workdir / 'checkpoints' / '10.corrupt'
  assert moved.is_dir()
  (warning,) = [r.message for r in caplog.records if 'moved' in r.message]
  assert warning.startswith('Checkpoint step 10 does not restore (')
  assert warning.endswith(
    f'moved it to {moved} and resumed from step 5 instead.'
  )
  # The cause is not buried under the echoes of the reads it broke.
  gc.collect()  # asyncio reports failed tasks when they are collected.
  assert not [u for u in unraisable if 'Event loop' in str(u.exc_value)]
  assert 'Task exception was never retrieved' not in caplog.text


def test_a_truncated_array_is_named_in_the_warning(trained, tmp_path, caplog):
  workdir = killed_copy(trained, tmp_path)
  truncate_arrays(workdir / 'checkpoints' / '10')
  pretrain.run(tiny_config(), str(workdir))
  (warning,) = [r.message for r in caplog.records if 'moved' in r.message]
  assert str(workdir / 'checkpoints' / '10' / 'state' / 'd') in warning


def test_when_no_step_restores_nothing_is_moved(trained, tmp_path):
  workdir = killed_copy(trained, tmp_path)
  for step in ('5', '10'):
    zero_arrays(workdir / 'checkpoints' / step)
  with pytest.raises(checkpoints.CheckpointRestoreError) as error:
    pretrain.run(tiny_config(), str(workdir))
  message = str(error.value)
  assert 'step 10: ' in message and 'step 5: ' in message
  assert 'Nothing was moved' in message
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == [
    '10', '5'
  ]  # fmt: skip


def test_reading_a_damaged_checkpoint_names_the_step(trained, tmp_path):
  workdir = killed_copy(trained, tmp_path)
  truncate_arrays(workdir / 'checkpoints' / '10')
  with pytest.raises(checkpoints.CheckpointRestoreError, match='Step 10 of'):
    checkpoints.read(str(workdir))


# ----------------------------------------------------------------------------
# Weights files: the file named, with the real reason.


def damaged_npz(trained, tmp_path, change) -> Path:
  path = tmp_path / 'model.npz'
  data = bytearray((trained[0] / 'model.npz').read_bytes())
  path.write_bytes(bytes(change(data)))
  return path


def flip_middle(data):
  middle = len(data) // 2
  data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle:][:64])
  return data


@pytest.mark.parametrize(
  'change',
  [lambda d: d[: len(d) // 2], lambda d: d[: len(d) - 30], flip_middle],
  ids=['truncated', 'truncated_end', 'bit_rot'],
)
def test_a_damaged_npz_names_the_path_and_reason(trained, tmp_path, change):
  path = damaged_npz(trained, tmp_path, change)
  with pytest.raises(ValueError) as error:
    checkpoints.read(str(path))
  message = str(error.value)
  assert message.startswith(f'{path} is not a readable .npz checkpoint (')
  assert 'truncated or corrupted' in message and 'pickle' not in message


@pytest.mark.parametrize(
  'content, reason',
  [
    (b'\x01' + np.random.default_rng(0).bytes(999), 'does not start like a'),
    (b'step,loss\n1,2.3\n', 'it is a text file'),
    (b'', 'it is empty'),
    (pickle.dumps({'params': [1, 2]}), 'pickled Python objects, which are '),
  ],
  ids=['random', 'text', 'empty', 'pickle'],
)
def test_a_file_that_is_no_npz_says_what_it_is(tmp_path, content, reason):
  path = tmp_path / 'weights.npz'
  path.write_bytes(content)
  with pytest.raises(ValueError) as error:
    checkpoints.read(str(path))
  message = str(error.value)
  assert message.startswith(f'{path} is not a .npz checkpoint: ')
  assert reason in message
  if 'pickle' not in reason:
    assert 'pickle' not in message


@pytest.mark.parametrize(
  'content', [b'{"model_name": "ViT-Ti', b'\xff\xfe\x00garbage']
)
def test_a_corrupt_model_json_names_the_file(trained, tmp_path, content):
  shutil.copy(trained[0] / 'model.npz', tmp_path / 'model.npz')
  (tmp_path / 'model.json').write_bytes(content)
  with pytest.raises(DescriptionError) as error:
    checkpoints.read(str(tmp_path / 'model.npz'))
  assert str(error.value).startswith(
    f'{tmp_path / "model.json"} is not valid JSON ('
  )


def test_the_export_replaces_an_earlier_one(trained, tmp_path):
  # A rerun after a kill between the export's rename and results.json
  # exports again over the first file.
  path = tmp_path / 'model.npz'
  path.write_bytes(b'an earlier export')
  checkpoints.export_npz(trained[0], path)
  exported, _ = checkpoints.read(str(path))
  original, _ = checkpoints.read(str(trained[0] / 'model.npz'))
  for key, value in checkpoints.flatten(original['params']).items():
    np.testing.assert_array_equal(
      checkpoints.flatten(exported['params'])[key], value
    )
  assert json.loads((tmp_path / 'model.json').read_text())['num_classes'] == 10

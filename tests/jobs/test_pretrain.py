"""The pretraining job end to end: resume, preemption, NaN, errors, hosts."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs import common
from configs import digits as digits_config
from helpers import COMPILATION_CACHE_FLAG, TINY_DIGITS
from vit_jax import checkpoints, loop
from vit_jax.jobs import pretrain

ROOT = Path(__file__).resolve().parents[2]

# A tiny model on 8x8 digits: fast enough to run many times.
TINY = {
  **TINY_DIGITS,
  'total_steps': 240,
  'log_every': 1,
  'checkpoint_every': 40,
  'keep_checkpoints': 10,
  'eval_every': 0,
}


def tiny_config(**overrides):
  config = digits_config.get_config()
  config.update_from_flattened_dict({**TINY, **overrides})
  return config


def main_command(workdir, *extra, **overrides):
  flags = [f'--config.{k}={v}' for k, v in {**TINY, **overrides}.items()]
  return [
    sys.executable,
    str(ROOT / 'main.py'),
    f'--config={ROOT / "configs/digits.py"}',
    f'--workdir={workdir}',
    COMPILATION_CACHE_FLAG,
    *flags,
    *extra,
  ]


def run_main(workdir, *extra, env=None, **overrides):
  return subprocess.run(
    main_command(workdir, *extra, **overrides),
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
    check=False,
  )


def train_losses(workdir):
  lines = (Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return {
    row['step']: row['train_loss']
    for row in map(json.loads, lines)
    if 'train_loss' in row
  }


def results(workdir):
  return json.loads((Path(workdir) / 'results.json').read_text())


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  run = run_main(workdir)
  assert run.returncode == 0, run.stderr[-3000:]
  return workdir


def start_and_stop(workdir, sig, after_step):
  """Starts a run and sends `sig` once the checkpoint of `after_step` exists."""
  process = subprocess.Popen(
    main_command(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
  )
  checkpoint = Path(workdir) / 'checkpoints' / str(after_step)
  deadline = time.time() + 240
  while not checkpoint.exists() and process.poll() is None:
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.01)
  os.kill(process.pid, sig)
  output = process.communicate(timeout=120)[0].decode()
  return process.returncode, output


def test_the_embedded_default_reaches_its_accuracy(uninterrupted):
  metrics = results(uninterrupted)
  assert set(metrics) == {
    'eval_accuracy', 'eval_loss', 'test_accuracy', 'test_loss'
  }  # fmt: skip
  # Even the tiny model learns the digits far above chance (10%).
  assert metrics['test_accuracy'] > 0.5
  config = json.loads((uninterrupted / 'config.json').read_text())
  assert config['total_steps'] == 240 and config['model']['hidden_size'] == 32
  assert any(
    p.name.startswith('events.out.tfevents') for p in uninterrupted.iterdir()
  )
  assert sorted(train_losses(uninterrupted)) == list(range(1, 241))


def test_sigkill_then_restart_ends_like_an_uninterrupted_run(
  uninterrupted, tmp_path
):
  code, _ = start_and_stop(tmp_path, signal.SIGKILL, after_step=80)
  assert code == -signal.SIGKILL
  assert not (tmp_path / 'results.json').exists(), 'the run was not killed'
  resumed = run_main(tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from step' in resumed.stderr
  assert results(tmp_path) == results(uninterrupted)
  losses, reference = train_losses(tmp_path), train_losses(uninterrupted)
  assert losses[240] == reference[240]


def test_sigterm_saves_and_exits_cleanly(uninterrupted, tmp_path):
  code, output = start_and_stop(tmp_path, signal.SIGTERM, after_step=40)
  assert code == 75, output[-3000:]  # EX_TEMPFAIL: restart to resume
  assert 'Stopped at step' in output
  stopped = checkpoints.StateCheckpoints(
    tmp_path / 'checkpoints', read_only=True
  )
  step = stopped.latest_step()
  stopped.close()
  assert 40 <= step < 240
  assert run_main(tmp_path).returncode == 0
  assert results(tmp_path) == results(uninterrupted)


def test_two_processes_follow_the_single_process_loss_curve(
  uninterrupted, tmp_path
):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = {
    **os.environ,
    'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
    'JAX_PLATFORMS': 'cpu',
  }
  processes = [
    subprocess.Popen(
      main_command(
        tmp_path,
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
        total_steps=40,
      ),
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0].decode() for p in processes]
  for p, out in zip(processes, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]
  assert 'Process 1 of 2; 8 cpu devices' in outputs[1]
  two = train_losses(tmp_path)
  # The single-process run uses a 240-step schedule: compare a 40-step one.
  one_dir = tmp_path / 'one_process'
  assert run_main(one_dir, total_steps=40).returncode == 0
  one = train_losses(one_dir)
  assert sorted(two) == list(range(1, 41))
  for step in one:
    assert two[step] == pytest.approx(one[step], rel=1e-5), step


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny_config(total_steps=20, checkpoint_every=1)
  config.optimizer.name = 'sgd'
  config.optimizer.grad_clip_norm = 0.0
  config.lr.base = 1e30
  config.lr.warmup_steps = 0
  config.lr.decay = 'constant'
  with pytest.raises(loop.NonFiniteLossError, match=r'at step (\d+)') as e:
    pretrain.run(config, str(tmp_path))
  bad_step = int(re.search(r'at step (\d+)', str(e.value)).group(1))
  assert bad_step > 1
  assert 'last good' in str(e.value) or 'no checkpoint is left' in str(e.value)
  # The parameters of step bad_step - 1 gave the bad loss: moved aside.
  saved = checkpoints.StateCheckpoints(tmp_path / 'checkpoints', read_only=True)
  assert (saved.latest_step() or 0) < bad_step - 1
  saved.close()
  assert (tmp_path / 'checkpoints' / f'{bad_step - 1}.diverged').is_dir()


# ----------------------------------------------------------------------------
# Bad input: errors that say how to fix them.


def test_batch_not_divisible_by_the_data_parallel_size(tmp_path):
  with pytest.raises(ValueError, match=r'batch_size=12 .* 8 devices'):
    pretrain.run(tiny_config(batch_size=12), str(tmp_path))


def test_unknown_model_name(tmp_path):
  config = tiny_config()
  config.model_name = 'ViT-B16'
  with pytest.raises(KeyError, match='Did you mean ViT-B_16'):
    pretrain.run(config, str(tmp_path))


def test_mesh_that_does_not_match_the_devices(tmp_path):
  config = tiny_config()
  config.mesh.data, config.mesh.model = 3, 2
  with pytest.raises(ValueError, match='needs 6 devices, but 8'):
    pretrain.run(config, str(tmp_path))


def test_workdir_of_another_model(tmp_path):
  pretrain.run(tiny_config(total_steps=2, checkpoint_every=1), str(tmp_path))
  other = tiny_config(total_steps=4)
  other.model.hidden_size = 64
  with pytest.raises(checkpoints.WorkdirMismatchError) as e:
    pretrain.run(other, str(tmp_path))
  assert 'Use a new --workdir' in str(e.value)
  assert 'overrides' in str(e.value)


def test_unknown_config_key_on_the_command_line(tmp_path):
  run = run_main(tmp_path, '--config.batch_sise=8')
  assert run.returncode != 0
  assert 'batch_sise' in run.stderr


# ----------------------------------------------------------------------------
# Configs: one per row of the paper's table, with Table 3's recipe.

TABLE_3 = {
  # row: (model, JFT base lr, JFT epochs)
  'vit_b32': ('ViT-B_32', 8e-4, 7),
  'vit_b16': ('ViT-B_16', 8e-4, 7),
  'vit_l32': ('ViT-L_32', 6e-4, 7),
  'vit_l16': ('ViT-L_16', 4e-4, 7),
  'vit_h14': ('ViT-H_14', 3e-4, 14),
  'r50_vit_b32': ('R50+ViT-B_32', 8e-4, 7),
  'r50_vit_b16': ('R50+ViT-B_16', 8e-4, 7),
  'r50_vit_l32': ('R50+ViT-L_32', 2e-4, 7),
  'r50_vit_l16': ('R50+ViT-L_16', 4e-4, 7),
  'bit_r50x1': ('BiT-R50x1', 1e-3, 7),
  'bit_r50x2': ('BiT-R50x2', 1e-3, 7),
  'bit_r101x1': ('BiT-R101x1', 8e-4, 7),
  'bit_r152x1': ('BiT-R152x1', 6e-4, 7),
  'bit_r152x2': ('BiT-R152x2', 6e-4, 7),
  'bit_r200x3': ('BiT-R200x3', 6e-4, 14),
}


def load(row, arg):
  module = __import__(f'configs.{row}', fromlist=['get_config'])
  return module.get_config(arg)


@pytest.mark.parametrize('row', sorted(TABLE_3))
def test_pretraining_configs_carry_table_3(row):
  model, lr, epochs = TABLE_3[row]
  jft = load(row, 'jft')
  assert jft.model_name == model
  assert (jft.lr.base, jft.num_epochs, jft.num_train_examples) == (
    lr, epochs, 303_000_000,
  )  # fmt: skip
  for config in (jft, load(row, 'imagenet21k'), load(row, 'imagenet2012')):
    assert config.optimizer.name == 'adam'
    assert (config.optimizer.b1, config.optimizer.b2) == (0.9, 0.999)
    assert config.batch_size == 4096 and config.image_size == 224
    assert config.lr.warmup_steps == 10_000
    assert config.optimizer.grad_clip_norm == 1.0
  i21k, i1k = load(row, 'imagenet21k'), load(row, 'imagenet2012')
  assert (jft.optimizer.weight_decay, jft.model.dropout_rate) == (0.1, 0.0)
  assert (i21k.lr.base, i21k.num_epochs, i21k.lr.decay) == (1e-3, 90, 'linear')
  assert (i21k.optimizer.weight_decay, i21k.model.dropout_rate) == (0.03, 0.1)
  assert (i1k.lr.base, i1k.num_epochs, i1k.lr.decay) == (3e-3, 300, 'cosine')
  assert (i1k.optimizer.weight_decay, i1k.model.dropout_rate) == (0.3, 0.1)


@pytest.mark.parametrize('row', ['vitc_s16', 'vitc_b16'])
def test_vitc_configs(row):
  config = load(row, 'imagenet2012')
  assert (
    config.model_name == {'vitc_s16': 'ViTc-S_16', 'vitc_b16': 'ViTc-B_16'}[row]
  )
  assert config.optimizer.weight_decay == 0.24
  assert not config.optimizer.decay_1d_params
  assert (config.num_epochs, config.lr.warmup_epochs) == (400, 5.0)


def test_unknown_dataset_argument():
  with pytest.raises(ValueError, match='imagenet21k'):
    common.pretrain('ViT-B_16', 'imagenet22k', jft_lr=1e-3)

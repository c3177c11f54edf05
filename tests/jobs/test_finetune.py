"""Fine-tuning: checkpoint surgery, transfer runs, sweeps, VTAB, export."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image
from test_pretrain import TINY, tiny_config

from configs import common
from helpers import (
  COMPILATION_CACHE_FLAG,
  TINY_VIT,
  abstract_params,
  init_params,
  randomize,
)
from mock_tfds import mocked_tfds
from vit_jax import checkpoints, models
from vit_jax.jobs import finetune, pretrain, vtab

ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------
# Position embeddings: bilinear with aligned corners, as scipy's zoom.


@pytest.mark.parametrize(
  'old, new', [((7, 7), (12, 12)), ((4, 6), (7, 3)), ((5, 5), (3, 8)),
               ((2, 2), (2, 2)), ((1, 1), (3, 3))]
)  # fmt: skip
@pytest.mark.parametrize('prefix', [0, 1])
def test_posemb_resize_equals_scipy_zoom(old, new, prefix):
  rng = np.random.default_rng(0)
  posemb = rng.standard_normal((1, prefix + old[0] * old[1], 5)).astype(
    np.float32
  )
  resized = checkpoints.resize_posemb(posemb, new, prefix, old_grid=old)
  assert resized.shape == (1, prefix + new[0] * new[1], 5)
  np.testing.assert_array_equal(resized[:, :prefix], posemb[:, :prefix])
  grid = posemb[0, prefix:].reshape(*old, 5).astype(np.float64)
  zoom = (new[0] / old[0], new[1] / old[1], 1)
  expected = scipy.ndimage.zoom(grid, zoom, order=1)
  assert expected.shape[:2] == new  # scipy agrees on the output grid
  np.testing.assert_allclose(
    resized[0, prefix:].reshape(*new, 5), expected, rtol=1e-5, atol=1e-6
  )


def test_square_grids_are_inferred():
  posemb = np.arange(17 * 2, dtype=np.float32).reshape(1, 17, 2)
  assert checkpoints.resize_posemb(posemb, (8, 8), 1).shape == (1, 65, 2)
  with pytest.raises(ValueError, match='pass old_grid'):
    checkpoints.resize_posemb(posemb[:, :15], (8, 8), 1)


# ----------------------------------------------------------------------------
# Surgery on parameter trees.


def pretrained_vit(**overrides):
  model = models.get_model(
    'ViT-B_16', 100, patch_size=4, **{**TINY_VIT, **overrides}
  )
  params = randomize(init_params(model, jnp.zeros((1, 16, 16, 3))))
  return {'params': params}


def target_of(model, size):
  return {'params': abstract_params(model, size)}


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_adapt_to_new_classes_and_resolution(classifier):
  pretrained = pretrained_vit(classifier=classifier, representation_size=16)
  model = models.get_model(
    'ViT-B_16', 7, patch_size=4, classifier=classifier, scan=True, **TINY_VIT
  )
  adapted = checkpoints.transfer(pretrained, target_of(model, 24))['params']
  assert np.all(adapted['head']['kernel'] == 0)
  assert adapted['head']['kernel'].shape == (32, 7)
  assert 'pre_logits' not in adapted  # the drop-head variant
  prefix = 1 if classifier == 'token' else 0
  posemb = adapted['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, prefix + 36, 32)
  old = pretrained['params']['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_array_equal(posemb[:, :prefix], old[:, :prefix])
  np.testing.assert_allclose(
    posemb[0, prefix:].reshape(6, 6, 32),
    scipy.ndimage.zoom(
      old[0, prefix:].reshape(4, 4, 32), (1.5, 1.5, 1), order=1
    ),
    rtol=1e-5,
    atol=1e-6,
  )
  # Everything else is the pretrained model, in the scanned layout.
  np.testing.assert_array_equal(
    adapted['Transformer']['encoderblock']['MlpBlock_3']['Dense_0']['kernel'][1],
    pretrained['params']['Transformer']['encoderblock_1']['MlpBlock_3'][
      'Dense_0']['kernel'],
  )  # fmt: skip


def test_adapt_keeps_the_representation_when_the_model_has_one():
  pretrained = pretrained_vit(representation_size=16)
  model = models.get_model(
    'ViT-B_16', 7, patch_size=4, representation_size=16, **TINY_VIT
  )
  adapted = checkpoints.transfer(pretrained, target_of(model, 16))['params']
  np.testing.assert_array_equal(
    adapted['pre_logits']['kernel'],
    pretrained['params']['pre_logits']['kernel'],
  )


def test_adapt_drops_pretraining_only_parameters():
  pretrained = pretrained_vit()
  pretrained['params']['mask_token'] = np.ones((1, 1, 32), np.float32)
  pretrained['params']['mpp_head'] = {'kernel': np.ones((32, 512))}
  model = models.get_model('ViT-B_16', 3, patch_size=4, **TINY_VIT)
  adapted = checkpoints.transfer(pretrained, target_of(model, 16))['params']
  assert 'mask_token' not in adapted and 'mpp_head' not in adapted


def test_adapt_rejects_other_architectures():
  pretrained = pretrained_vit()
  model = models.get_model(
    'ViT-B_16', 3, patch_size=4, **{**TINY_VIT, 'num_layers': 3}
  )
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    checkpoints.transfer(pretrained, target_of(model, 16))
  assert 'encoderblock_2' in str(e.value)


def test_adapt_bit_and_hybrid():
  bit = models.get_model('BiT-R50x1', 100, stage_sizes=(1, 1))
  bit_params = randomize(init_params(bit, jnp.zeros((1, 32, 32, 3))))
  new_bit = models.get_model('BiT-R50x1', 5, stage_sizes=(1, 1))
  adapted = checkpoints.transfer({'params': bit_params}, target_of(new_bit, 64))
  assert adapted['params']['head']['kernel'].shape == (512, 5)
  hybrid = models.get_model('R50+ViT-B_16', 100, resnet_stages=(1,), **TINY_VIT)
  hybrid_params = randomize(init_params(hybrid, jnp.zeros((1, 32, 32, 3))))
  adapted = checkpoints.transfer(
    {'params': hybrid_params},
    target_of(
      models.get_model('R50+ViT-B_16', 5, resnet_stages=(1,), **TINY_VIT), 64
    ),
  )
  # /4 feature map: 8x8 -> 16x16 tokens.
  posemb = adapted['params']['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 257, 32)


# ----------------------------------------------------------------------------
# Transfer runs: pretrain at one resolution, fine-tune at a higher one on
# another dataset.

PATTERNS = ('horizontal', 'vertical', 'checkerboard')


def pattern_image(kind, rng):
  """Stripes or checks of random period, phase and colours."""
  period = int(rng.integers(2, 5))
  y, x = np.mgrid[:16, :16] + rng.integers(0, period, 2)[:, None, None]
  wave = {
    'horizontal': (y // period) % 2,
    'vertical': (x // period) % 2,
    'checkerboard': (y // period + x // period) % 2,
  }[kind]
  colours = rng.integers(0, 256, (2, 3))
  return colours[wave].astype(np.uint8)


@pytest.fixture(scope='module')
def patterns(tmp_path_factory):
  root = tmp_path_factory.mktemp('patterns')
  rng = np.random.default_rng(0)
  for split, count in (('train', 32), ('test', 16)):
    for kind in PATTERNS:
      (root / split / kind).mkdir(parents=True)
      for i in range(count):
        Image.fromarray(pattern_image(kind, rng)).save(
          root / split / kind / f'{i}.png'
        )
  return root


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A tiny ViT pretrained on the digits at 8x8, exported as .npz too."""
  workdir = tmp_path_factory.mktemp('pretrained')
  pretrain.run(tiny_config(total_steps=60, export_npz=True), str(workdir))
  return workdir


# Fine-tuning on the patterns at 16x16 (a 4x4 grid instead of 2x2).
FINETUNE = {
  'image_size': 16,
  'batch_size': 24,
  'eval_batch_size': 24,
  'total_steps': 60,
  'log_every': 10,
  'checkpoint_every': 20,
  'lr.warmup_steps': 5,
  'lr.base': 0.03,
}


def finetune_config(dataset, init, **overrides):
  config = common.finetune('ViT-Ti_16', 'digits')
  config.dataset = str(dataset)
  config.init = str(init)
  config.update_from_flattened_dict({**FINETUNE, **overrides})
  return config


@pytest.fixture(scope='module')
def from_orbax(patterns, pretrained, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('from_orbax')
  results = finetune.run(finetune_config(patterns, pretrained), str(workdir))
  return workdir, results


def test_finetune_from_the_orbax_checkpoint(from_orbax):
  workdir, results = from_orbax
  assert results['test_accuracy'] > 0.6  # chance: 1/3
  # The fine-tuned model is exported with its description.
  description = json.loads((workdir / 'model.json').read_text())
  assert description['num_classes'] == 3 and description['image_size'] == 16
  assert description['overrides']['hidden_size'] == 32
  params = checkpoints.load_npz(workdir / 'model.npz')
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (
    1, 17, 32,
  )  # fmt: skip


def test_finetune_from_the_exported_npz(patterns, pretrained, tmp_path):
  # Without the description beside the file, the config gives the
  # architecture, as for a published checkpoint.
  npz = tmp_path / 'published.npz'
  npz.write_bytes((pretrained / 'model.npz').read_bytes())
  config = finetune_config(patterns, npz)
  for key, value in TINY.items():
    if key.startswith('model.'):
      config.model[key.removeprefix('model.')] = value
  config.model.patch_size = 4
  results = finetune.run(config, str(tmp_path / 'run'))
  assert results['test_accuracy'] > 0.6


def test_finetuning_another_model_is_an_error(patterns, pretrained, tmp_path):
  config = finetune_config(patterns, pretrained)
  config.model_name = 'ViT-S_16'
  with pytest.raises(ValueError, match='holds a ViT-Ti_16 checkpoint'):
    finetune.run(config, str(tmp_path))
  config = finetune_config(patterns, pretrained)
  config.init = None
  with pytest.raises(ValueError, match=r'Set --config\.init'):
    finetune.run(config, str(tmp_path))


def test_a_killed_finetune_resumes_to_the_same_result(
  patterns, pretrained, from_orbax, tmp_path
):
  flags = [f'--config.{k}={v}' for k, v in FINETUNE.items()]
  command = [
    sys.executable, str(ROOT / 'main.py'),
    f'--config={ROOT / "configs/finetune.py"}:ViT-Ti_16,digits',
    f'--config.dataset={patterns}', f'--config.init={pretrained}',
    f'--workdir={tmp_path}', COMPILATION_CACHE_FLAG, *flags,
  ]  # fmt: skip
  process = subprocess.Popen(
    command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
  )
  checkpoint = tmp_path / 'checkpoints' / '20'
  deadline = time.time() + 240
  while not checkpoint.exists() and process.poll() is None:
    assert time.time() < deadline
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.communicate(timeout=60)
  assert not (tmp_path / 'results.json').exists(), 'the run was not killed'
  resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from step' in resumed.stderr
  _, uninterrupted = from_orbax
  assert json.loads((tmp_path / 'results.json').read_text()) == uninterrupted


def test_learning_rate_sweep(patterns, pretrained, tmp_path):
  config = finetune_config(
    patterns, pretrained, total_steps=20, checkpoint_every=100, sweep=True
  )
  config.lr_grid = (0.003, 0.03)
  config.splits.train = 'train[:75%]'
  config.splits.val = 'train[75%:]'
  config.splits.train_full = 'train'
  table = finetune.run(config, str(tmp_path))
  scores = table['val_accuracy']
  assert set(scores) == {'0.003', '0.03'}
  assert table['best_lr'] == max(
    (float(lr) for lr in scores), key=lambda lr: scores[f'{lr:g}']
  )
  final = json.loads((tmp_path / 'final' / 'config.json').read_text())
  assert final['train_split'] == 'train_full' and final['eval_split'] == 'test'
  assert final['lr']['base'] == table['best_lr']
  written = json.loads((tmp_path / 'results.json').read_text())
  assert written['test_accuracy'] == table['test_accuracy']
  assert '(chosen)' in (tmp_path / 'results.md').read_text()


def test_vtab_runner_on_mock_data(pretrained, tmp_path):
  config = finetune_config('vtab/dtd', pretrained, image_size=8, total_steps=3)
  config.job = 'vtab'
  config.vtab_tasks = ('dtd', 'eurosat', 'dsprites_location')
  with mocked_tfds():
    summary = vtab.run(config, str(tmp_path))
  tasks = summary['tasks']
  assert set(tasks) == {'dtd', 'eurosat', 'dsprites_location'}
  assert summary['natural'] == tasks['dtd']
  assert summary['specialized'] == tasks['eurosat']
  assert summary['structured'] == tasks['dsprites_location']
  assert summary['mean'] == pytest.approx(np.mean(list(tasks.values())))
  for task in tasks:
    run = json.loads((tmp_path / task / 'config.json').read_text())
    assert (
      run['dataset'] == f'vtab/{task}' and run['train_split'] == 'train_full'
    )
  table = (tmp_path / 'results.md').read_text()
  assert '| natural | dtd |' in table and 'mean of 3' in table
  with pytest.raises(ValueError, match='Unknown VTAB task'):
    vtab.task_config(config, 'imagenet')


def test_export_writes_a_loadable_npz(pretrained, tmp_path):
  path = checkpoints.export_npz(pretrained, tmp_path / 'x.npz')
  variables, description = checkpoints.read(str(path))
  orbax_variables, _ = checkpoints.read(str(pretrained))
  for a, b in zip(
    jax.tree.leaves(variables), jax.tree.leaves(orbax_variables), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  assert description.model_name == 'ViT-Ti_16'

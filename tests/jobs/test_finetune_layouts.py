"""The fine-tuning job started from timm, transformers and big_vision files.

Each file is written from random parameters under the other codebase's
names (tests/weight_files.py); the job transfers them and trains a few
steps on the digits.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import weight_files as wf

from configs import common
from helpers import TINY_VIT, init_params, randomize
from vit_jax import checkpoints, models
from vit_jax.jobs import finetune

DEPTH = TINY_VIT['num_layers']
BLOCK_KERNEL = ('Transformer', 'encoderblock_1', 'MlpBlock_3', 'Dense_0')


@pytest.fixture(scope='module')
def pretrained():
  model = models.get_model('ViT-B_16', 7, patch_size=4, **TINY_VIT)
  params = randomize(init_params(model, jnp.zeros((1, 16, 16, 3))))
  flat = {k: np.asarray(v) for k, v in checkpoints.flatten(params).items()}
  flat['Transformer/posembed_input/pos_embedding'][:, 0] = 0.0
  return flat


def write(kind, flat, directory):
  if kind == 'timm':
    config = {
      'architecture': 'vit_base_patch16_224',
      'num_classes': 7,
      'model_args': dict(
        embed_dim=32, depth=DEPTH, num_heads=4, mlp_ratio=2.0, patch_size=4,
        img_size=16,
      ),
    }  # fmt: skip
    state = wf.timm_vit(flat, DEPTH)
    return wf.write_safetensors(directory / 'model.safetensors', state, config)
  if kind == 'transformers':
    config = wf.transformers_config(32, DEPTH, 4, 64, 4, 16, 7)
    state = wf.transformers_vit(flat, DEPTH)
    wf.write_safetensors(directory / 'model.safetensors', state, config)
    return directory
  directory.mkdir()
  path = directory / 'big_vision.npz'
  np.savez(path, **wf.big_vision_vit(flat, DEPTH))
  return path


@pytest.mark.parametrize('kind', ['timm', 'transformers', 'big_vision'])
def test_finetune_starts_from_the_file(tmp_path, pretrained, kind):
  init = write(kind, pretrained, tmp_path / 'weights')
  config = common.finetune('ViT-B_16', 'digits')
  config.init = str(init)
  config.model.num_heads = 4  # the tiny width is no registry model's
  config.update_from_flattened_dict({
    'image_size': 16, 'batch_size': 16, 'eval_batch_size': 32,
    'total_steps': 3, 'log_every': 1, 'checkpoint_every': 3,
    'eval_every': 0, 'lr.warmup_steps': 1, 'export_npz': False,
  })  # fmt: skip
  # The task's first weights are the file's, with a new zero head.
  task = finetune.make_task(config, _FakeDataset(10))
  variables = task.initial_variables()['params']
  kernel = variables
  for key in BLOCK_KERNEL:
    kernel = kernel[key]
  np.testing.assert_array_equal(
    kernel['kernel'], pretrained['/'.join(BLOCK_KERNEL) + '/kernel']
  )
  assert not np.any(variables['head']['kernel'])
  if kind != 'big_vision':
    assert task.model.gelu_approximate is False  # timm and transformers
  results = finetune.run(config, str(tmp_path / 'run'))
  assert 0.0 <= results['eval_accuracy'] <= 1.0
  assert (tmp_path / 'run' / 'checkpoints' / '3').exists()


class _FakeDataset:
  """What `make_task` reads of a dataset."""

  def __init__(self, num_classes):
    self.num_classes = num_classes
    self.class_names = None

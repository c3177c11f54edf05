"""Published-layout .npz files: keys, round trips, conversions and errors."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY_VIT, abstract_params, init_params, randomize
from vit_jax import checkpoints, models


def tiny_vit(**overrides):
  model = models.get_model(
    'ViT-B_16', 5, patch_size=4, **{**TINY_VIT, **overrides}
  )
  images = jnp.zeros((1, 16, 16, 3))
  return model, randomize(init_params(model, images)), images


def published_vit_keys(depth, representation=False):
  """The published key list, written out independently."""
  keys = {
    'embedding/kernel', 'embedding/bias', 'cls',
    'Transformer/posembed_input/pos_embedding',
    'Transformer/encoder_norm/scale', 'Transformer/encoder_norm/bias',
    'head/kernel', 'head/bias',
  }  # fmt: skip
  for i in range(depth):
    b = f'Transformer/encoderblock_{i}/'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      keys |= {b + ln + '/scale', b + ln + '/bias'}
    for proj in ('query', 'key', 'value', 'out'):
      a = b + 'MultiHeadDotProductAttention_1/' + proj
      keys |= {a + '/kernel', a + '/bias'}
    for dense in ('Dense_0', 'Dense_1'):
      keys |= {
        b + 'MlpBlock_3/' + dense + '/kernel',
        b + 'MlpBlock_3/' + dense + '/bias',
      }
  if representation:
    keys |= {'pre_logits/kernel', 'pre_logits/bias'}
  return keys


def test_vit_b16_keys_and_shapes_follow_the_published_layout():
  params = abstract_params(models.get_model('ViT-B_16', 1000), 224)
  flat = checkpoints.flatten(params)
  assert set(flat) == published_vit_keys(12)
  shapes = {k: v.shape for k, v in flat.items()}
  b = 'Transformer/encoderblock_3/'
  assert shapes['embedding/kernel'] == (16, 16, 3, 768)
  assert shapes['cls'] == (1, 1, 768)
  assert shapes['Transformer/posembed_input/pos_embedding'] == (1, 197, 768)
  assert shapes[b + 'MultiHeadDotProductAttention_1/query/kernel'] == (
    768,
    12,
    64,
  )
  assert shapes[b + 'MultiHeadDotProductAttention_1/query/bias'] == (12, 64)
  assert shapes[b + 'MultiHeadDotProductAttention_1/out/kernel'] == (
    12,
    64,
    768,
  )
  assert shapes[b + 'MlpBlock_3/Dense_0/kernel'] == (768, 3072)
  assert shapes['head/kernel'] == (768, 1000)


def test_npz_round_trip(tmp_path):
  _, params, _ = tiny_vit(representation_size=8)
  path = tmp_path / 'vit.npz'
  checkpoints.save_npz(path, params)
  with np.load(path, allow_pickle=False) as f:
    assert set(f.files) == published_vit_keys(2, representation=True)
    assert all(f[k].dtype == np.float32 for k in f.files)
  loaded = checkpoints.load_npz(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(
    jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def per_type_numbering(flat):
  """Renames to newer Flax's per-type numbering inside blocks."""
  names = {
    'LayerNorm_2': 'LayerNorm_1',
    'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
    'MlpBlock_3': 'MlpBlock_0',
  }
  return {
    re.sub('|'.join(names), lambda m: names[m.group(0)], key): value
    for key, value in flat.items()
  }


def test_per_type_numbering_reads_and_writes_published_numbering(tmp_path):
  _, params, _ = tiny_vit()
  flat = per_type_numbering(checkpoints.flatten(params))
  assert 'Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel' in flat
  np.savez(tmp_path / 'per_type.npz', **flat)
  loaded = checkpoints.load_npz(tmp_path / 'per_type.npz')
  np.testing.assert_array_equal(
    loaded['Transformer']['encoderblock_1']['MlpBlock_3']['Dense_0']['kernel'],
    params['Transformer']['encoderblock_1']['MlpBlock_3']['Dense_0']['kernel'],
  )
  # Writing a per-type tree gives the published numbering.
  checkpoints.save_npz(tmp_path / 'out.npz', checkpoints.unflatten(flat))
  with np.load(tmp_path / 'out.npz') as f:
    assert set(f.files) == published_vit_keys(2)


def test_scanned_model_writes_per_block_keys_and_loads_back(tmp_path):
  model, params, images = tiny_vit()
  scanned = model.clone(scan=True)
  scanned_params = checkpoints.fit_to_model(
    params, abstract_params(scanned, 16)
  )
  checkpoints.save_npz(tmp_path / 's.npz', scanned_params)
  with np.load(tmp_path / 's.npz') as f:
    assert set(f.files) == published_vit_keys(2)
  # Load into the scanned and the unrolled model: same logits.
  loaded = checkpoints.load_npz(tmp_path / 's.npz')
  for m in (model, scanned):
    fitted = checkpoints.fit_to_model(loaded, abstract_params(m, 16))
    np.testing.assert_allclose(
      m.apply({'params': fitted}, images),
      model.apply({'params': params}, images),
      rtol=1e-5,
      atol=1e-5,
    )


def test_known_prefixes_are_stripped(tmp_path):
  _, params, _ = tiny_vit()
  for prefix in ('opt/target/', 'params/'):
    flat = {prefix + k: v for k, v in checkpoints.flatten(params).items()}
    np.savez(tmp_path / 'p.npz', **flat)
    loaded = checkpoints.flatten(checkpoints.load_npz(tmp_path / 'p.npz'))
    assert set(loaded) == published_vit_keys(2)


def test_bit_uses_the_bit_authors_layout(tmp_path):
  model = models.get_model('BiT-R50x1', 7, stage_sizes=(2, 1))
  params = randomize(init_params(model, jnp.zeros((1, 32, 32, 3))))
  checkpoints.save_npz(tmp_path / 'bit.npz', params)
  with np.load(tmp_path / 'bit.npz') as f:
    keys = set(f.files)
    assert all(k.startswith('resnet/') for k in keys)
    assert f['resnet/head/conv2d/kernel'].shape == (1, 1, 512, 7)  # 4 x 128
    assert f['resnet/root_block/standardized_conv2d/kernel'].shape == (
      7,
      7,
      3,
      64,
    )
    assert f['resnet/block1/unit01/a/group_norm/gamma'].shape == (64,)
    assert f['resnet/block2/unit01/a/proj/standardized_conv2d/kernel'].shape == (
      1, 1, 256, 512,
    )  # fmt: skip
  assert 'resnet/group_norm/beta' in keys
  assert 'resnet/block1/unit02/a/proj/standardized_conv2d/kernel' not in keys
  loaded = checkpoints.load_npz(tmp_path / 'bit.npz')
  for a, b in zip(
    jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_group_norm_scales_stored_4d_are_squeezed(tmp_path):
  model = models.get_model('R50+ViT-B_16', 3, resnet_stages=(1,), **TINY_VIT)
  params = init_params(model, jnp.zeros((1, 32, 32, 3)))
  flat = checkpoints.flatten(params)
  flat = {
    k: v.reshape(1, 1, 1, -1) if '/gn' in k or k.startswith('gn_root') else v
    for k, v in flat.items()
  }
  assert flat['gn_root/scale'].shape == (1, 1, 1, 64)
  np.savez(tmp_path / 'h.npz', **flat)
  loaded = checkpoints.load_npz(tmp_path / 'h.npz')
  checkpoints.fit_to_model(loaded, abstract_params(model, 32))  # no error


def test_mismatch_lists_missing_unexpected_and_misshaped_keys():
  _, params, _ = tiny_vit()
  flat = checkpoints.flatten(params)
  del flat['Transformer/encoder_norm/scale']
  flat['extra/kernel'] = np.zeros(3)
  flat['head/kernel'] = np.zeros((32, 9))
  target = abstract_params(
    models.get_model('ViT-B_16', 5, patch_size=4, **TINY_VIT), 16
  )
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    checkpoints.fit_to_model(checkpoints.unflatten(flat), target)
  message = str(e.value)
  assert 'missing from the checkpoint (1)' in message
  assert 'Transformer/encoder_norm/scale' in message
  assert (
    'unexpected in the checkpoint (1)' in message and 'extra/kernel' in message
  )
  assert 'head/kernel: checkpoint (32, 9), model (32, 5)' in message


def test_unreadable_files_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint file'):
    checkpoints.load_npz(tmp_path / 'missing.npz')
  (tmp_path / 'bad.npz').write_bytes(b'not a zip file')
  with pytest.raises(ValueError, match=r'not a \.npz checkpoint: it is a text'):
    checkpoints.load_npz(tmp_path / 'bad.npz')


def test_a_failed_save_leaves_the_previous_file_intact(tmp_path):
  _, params, _ = tiny_vit()
  path = tmp_path / 'vit.npz'
  checkpoints.save_npz(path, params)
  before = path.read_bytes()
  bad = {**params, 'head': {'kernel': object(), 'bias': np.zeros(5)}}
  with pytest.raises(TypeError):
    checkpoints.save_npz(path, bad)
  assert path.read_bytes() == before


def test_batch_stats_round_trip(tmp_path):
  model = models.get_model(
    'ViTc-S_16', 3, conv_stem=((8, 2), (16, 2)), **TINY_VIT
  )
  images = jnp.ones((2, 16, 16, 3))
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), images))
  variables['batch_stats'] = randomize(variables['batch_stats'])
  checkpoints.save_npz(
    tmp_path / 'c.npz', variables['params'], variables['batch_stats']
  )
  with np.load(tmp_path / 'c.npz') as f:
    assert 'batch_stats/stem_bn0/mean' in f.files
  loaded = checkpoints.load_npz_variables(tmp_path / 'c.npz')
  assert 'batch_stats' not in checkpoints.load_npz(tmp_path / 'c.npz')
  for a, b in zip(
    jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True
  ):
    np.testing.assert_array_equal(a, b)

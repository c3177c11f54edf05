"""Weights of timm, transformers and big_vision: read, write, errors.

Every file is written by tests/weight_files.py from random parameters under
the other codebase's names; the loaded model's logits are compared with the
float64 numpy reference of tests/numpy_reference.py on the same parameters.
"""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import weight_files as wf

import numpy_reference as ref
from helpers import TINY_VIT, init_params, random_images, randomize
from vit_jax import checkpoints, models
from vit_jax.checkpoints import infer

DEPTH = TINY_VIT['num_layers']
POSEMB = 'Transformer/posembed_input/pos_embedding'


def random_model(name, image_size, num_classes=5, seed=0, **overrides):
  """A tiny model's flat published float32 params (random, non-zero)."""
  model = models.get_model(name, num_classes, **overrides)
  images = jnp.zeros((1, image_size, image_size, 3))
  params = randomize(init_params(model, images), seed)
  return {
    k: np.asarray(v, np.float32) for k, v in checkpoints.flatten(params).items()
  }


def tiny_vit(image_size=16, **overrides):
  return random_model(
    'ViT-B_16', image_size, patch_size=4, **{**TINY_VIT, **overrides}
  )


def f64(flat):
  return {k: np.asarray(v, np.float64) for k, v in flat.items()}


def max_diff(loaded, expected, image_size=16, batch=2):
  images = random_images((batch, image_size, image_size, 3))
  logits = loaded.model.apply(loaded.variables, images, train=False)
  want = expected(np.asarray(images, np.float64))
  return float(np.max(np.abs(np.asarray(logits, np.float64) - want)))


TIMM_TINY_ARGS = dict(
  embed_dim=32, depth=DEPTH, num_heads=4, mlp_ratio=2.0, patch_size=4,
  img_size=16,
)  # fmt: skip


def timm_config(architecture, num_classes, **model_args):
  return {
    'architecture': architecture,
    'num_classes': num_classes,
    'pretrained_cfg': {'input_size': [3, 16, 16], 'num_classes': num_classes},
    'model_args': model_args,
  }


# ----------------------------------------------------------------------------
# timm


@pytest.mark.parametrize(
  'classifier, pool_args',
  [
    ('token', {}),
    ('map', dict(class_token=False, global_pool='map')),
    ('gap', dict(class_token=False, global_pool='avg', fc_norm=False)),
  ],
)
def test_timm_vit_matches_the_reference(tmp_path, classifier, pool_args):
  p = tiny_vit(classifier=classifier)
  config = timm_config('vit_base_patch16_224', 5, **TIMM_TINY_ARGS, **pool_args)
  path = wf.write_safetensors(
    tmp_path / 'snapshot' / 'model.safetensors', wf.timm_vit(p, DEPTH), config
  )
  loaded = checkpoints.load(path.parent)  # The hub snapshot directory.
  assert loaded.description.model_name == 'ViT-B_16'
  assert loaded.model.gelu_approximate is False  # timm: exact GELU.
  assert loaded.model.classifier == classifier
  diff = max_diff(
    loaded,
    lambda x: ref.vit(
      f64(p), x, 4, DEPTH, classifier=classifier, gelu_approximate=False
    ),
  )
  assert diff <= 1e-4, diff


def test_timm_hybrid_matches_the_reference(tmp_path):
  stages = (1, 1)
  p = random_model('R26+ViT-S_32', 32, resnet_stages=stages, **TINY_VIT, seed=1)
  config = timm_config(
    'vit_small_r26_s32_224', 5, embed_dim=32, depth=DEPTH, num_heads=4,
    mlp_ratio=2.0, img_size=32, act_layer='gelu_tanh',
  )  # fmt: skip
  path = wf.write_safetensors(
    tmp_path / 'model.safetensors', wf.timm_hybrid(p, DEPTH, stages), config
  )
  loaded = checkpoints.load(path)
  assert loaded.description.model_name == 'R26+ViT-S_32'
  assert tuple(loaded.model.resnet_stages) == stages
  diff = max_diff(
    loaded, lambda x: ref.hybrid(f64(p), x, stages, DEPTH), image_size=32
  )
  assert diff <= 1e-3, diff


def test_timm_bit_matches_the_reference(tmp_path):
  stages = (1, 1)
  p = random_model('BiT-R50x1', 32, stage_sizes=stages, seed=2)
  authors = checkpoints.npz.to_published(checkpoints.unflatten(p))
  config = {'architecture': 'resnetv2_50x1_bit', 'num_classes': 5}
  path = wf.write_safetensors(
    tmp_path / 'model.safetensors', wf.timm_bit(authors, stages), config
  )
  loaded = checkpoints.load(path, image_size=32)
  assert loaded.description.model_name == 'BiT-R50x1'
  diff = max_diff(
    loaded, lambda x: ref.bit(f64(authors), x, stages), image_size=32
  )
  assert diff <= 1e-3, diff


def test_timm_names_give_the_model_without_config(tmp_path):
  # No config.json: the file's timm name gives the registry model and the
  # heads (a Ti/16 at its real width, one block to stay small).
  p = random_model('ViT-Ti_16', 32, num_layers=1, seed=3)
  path = wf.write_safetensors(
    tmp_path / 'vit_tiny_patch16_224.augreg_in21k.safetensors',
    wf.timm_vit(p, 1),
  )
  loaded = checkpoints.load(path)
  assert loaded.description.model_name == 'ViT-Ti_16'
  assert loaded.model.num_heads == 3 and loaded.description.image_size == 32
  diff = max_diff(
    loaded,
    lambda x: ref.vit(f64(p), x, 16, 1, gelu_approximate=False),
    image_size=32,
  )
  assert diff <= 1e-4, diff


# ----------------------------------------------------------------------------
# transformers


@pytest.mark.parametrize('head', [True, False], ids=['classifier', 'vitmodel'])
def test_transformers_vit_matches_the_reference(tmp_path, head):
  if head:
    p = tiny_vit()
  else:  # ViTModel: the pooler is a representation layer, no head.
    p = random_model(
      'ViT-B_16', 16, None, patch_size=4, representation_size=32, **TINY_VIT
    )
  config = wf.transformers_config(32, DEPTH, 4, 64, 4, 16, 5 if head else 0)
  state = wf.transformers_vit(p, DEPTH, prefix='vit.' if head else '')
  path = wf.write_safetensors(tmp_path / 'model.safetensors', state, config)
  # A tiny width is no registry model: the name to start from is given.
  loaded = checkpoints.load(tmp_path, model_name='ViT-B_16')
  assert loaded.model.layer_norm_eps == 1e-12
  assert loaded.model.gelu_approximate is False
  if head:
    assert loaded.description.class_names[:2] == ('class_0', 'class_1')

  def expected(x):
    if head:
      return ref.vit(f64(p), x, 4, DEPTH, gelu_approximate=False, eps=1e-12)
    # The reference's head: an identity after the pooler.
    q = {**f64(p), 'head/kernel': np.eye(32), 'head/bias': np.zeros(32)}
    return ref.vit(q, x, 4, DEPTH, gelu_approximate=False, eps=1e-12)

  assert max_diff(loaded, expected) <= 1e-4
  assert path.exists()


# ----------------------------------------------------------------------------
# big_vision


@pytest.mark.parametrize(
  'options, scan',
  [
    (dict(classifier='token'), False),
    (dict(classifier='map', posemb='sincos2d'), False),
    (dict(classifier='gap'), True),
  ],
  ids=['tok-learn', 'map-sincos', 'gap-scanned'],
)
def test_big_vision_vit_matches_the_reference(tmp_path, options, scan):
  p = tiny_vit(**options)
  if 'cls' in p:  # big_vision's class token gets no position embedding.
    p[POSEMB][:, 0] = 0.0
  bf16 = ('embedding/kernel', 'head/kernel')
  path = tmp_path / 'vit.npz'
  np.savez(path, **wf.big_vision_vit(p, DEPTH, scan=scan, bfloat16=bf16))
  for key in bf16:  # The reference sees the rounded values.
    p[key] = np.asarray(p[key].astype(ml_dtypes.bfloat16), np.float32)
  variables, _ = checkpoints.read(path, model_name='ViT-B_16')
  assert variables['params']['embedding']['kernel'].dtype == np.float32
  # A fixed embedding does not tell the resolution: it is given.
  loaded = checkpoints.load(path, model_name='ViT-B_16', image_size=16)
  assert loaded.model.classifier == options['classifier']
  assert loaded.model.posemb == options.get('posemb', 'learn')
  diff = max_diff(
    loaded,
    lambda x: ref.vit(
      f64(p), x, 4, DEPTH, classifier=options['classifier'],
      posemb=options.get('posemb', 'learn'),
    ),
  )  # fmt: skip
  assert diff <= 1e-4, diff


# ----------------------------------------------------------------------------
# Names: AugReg files and timm architectures.


def test_augreg_file_names_give_the_model(tmp_path):
  p = tiny_vit()
  name = 'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0'
  path = tmp_path / f'{name}--imagenet2012-steps_20k-lr_0.01-res_16.npz'
  np.savez(path, **p)
  loaded = checkpoints.load(path)  # No model_name needed.
  assert loaded.description.model_name == 'ViT-B_16'
  assert loaded.model.num_heads == 4  # From the (D, H, Dh) kernels.
  diff = max_diff(loaded, lambda x: ref.vit(f64(p), x, 4, DEPTH))
  assert diff <= 1e-4, diff
  for file, model, resolution in [
    ('R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz',
     'R26+ViT-S_32', None),
    ('R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--'
     'imagenet2012-steps_20k-lr_0.03-res_384.npz', 'R+ViT-Ti_16', 384),
    ('R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1.npz',
     'R50+ViT-L_32', None),
    ('ViT-L_16-224.npz', 'ViT-L_16', 224),
    ('vit_small_r26_s32_384.augreg_in21k_ft_in1k.safetensors',
     'R26+ViT-S_32', 384),
  ]:  # fmt: skip
    assert infer.name_from_file(file) == (model, resolution)
  # Files that name no model (transformers') get the registry model of
  # their shapes.
  b16 = dict(hidden_size=768, num_layers=12, mlp_dim=3072, num_heads=12)
  assert infer.matching_model(dict(b16, patch_size=16)) == 'ViT-B_16'
  assert infer.matching_model(dict(b16, patch_size=8)) == 'ViT-B_8'
  assert infer.matching_model(dict(b16, patch_size=4)) is None


# ----------------------------------------------------------------------------
# Writing: timm's table, round trips.


def timm_keys(depth, hybrid_stages=None):
  """timm's key list for a token ViT (and its hybrid backbone), as
  vision_transformer.py and resnetv2.py name them."""
  keys = {'cls_token', 'pos_embed', 'patch_embed.proj.weight',
          'patch_embed.proj.bias', 'norm.weight', 'norm.bias', 'head.weight',
          'head.bias'}  # fmt: skip
  for i in range(depth):
    for part in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1',
                 'mlp.fc2'):  # fmt: skip
      keys |= {f'blocks.{i}.{part}.weight', f'blocks.{i}.{part}.bias'}
  if hybrid_stages is not None:
    bb = 'patch_embed.backbone.'
    keys |= {bb + 'stem.conv.weight', bb + 'stem.norm.weight',
             bb + 'stem.norm.bias'}  # fmt: skip
    for s, units in enumerate(hybrid_stages):
      for u in range(units):
        t = f'{bb}stages.{s}.blocks.{u}.'
        keys |= {t + f'conv{r}.weight' for r in (1, 2, 3)}
        keys |= {
          t + f'norm{r}.{w}' for r in (1, 2, 3) for w in ('weight', 'bias')
        }
        if u == 0:
          keys |= {t + 'downsample.conv.weight', t + 'downsample.norm.weight',
                   t + 'downsample.norm.bias'}  # fmt: skip
  return keys


def test_safetensors_follow_timms_table(tmp_path):
  p = tiny_vit()
  description = checkpoints.ModelDescription(
    'ViT-B_16', 5, 16, dict(patch_size=4, **TINY_VIT)
  )
  path = checkpoints.save(
    tmp_path / 'model.safetensors',
    {'params': checkpoints.unflatten(p)},
    description,
    format='safetensors',
  )
  import safetensors.numpy

  sd = safetensors.numpy.load_file(str(path))
  assert set(sd) == timm_keys(DEPTH)
  d, m = 32, 64
  assert sd['patch_embed.proj.weight'].shape == (d, 3, 4, 4)
  assert sd['pos_embed'].shape == (1, 17, d)
  assert sd['blocks.0.attn.qkv.weight'].shape == (3 * d, d)
  assert sd['blocks.0.mlp.fc1.weight'].shape == (m, d)
  assert sd['head.weight'].shape == (5, d)
  # Rows q, k, v; head-major within each.
  q = p[
    'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel'
  ]
  np.testing.assert_array_equal(
    sd['blocks.0.attn.qkv.weight'][:d], q.reshape(d, d).T
  )
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['architecture'] == 'vit_base_patch16_224'
  assert config['num_classes'] == 5
  assert config['pretrained_cfg']['input_size'] == [3, 16, 16]
  assert config['pretrained_cfg']['mean'] == [0.5, 0.5, 0.5]
  assert config['model_args'] == dict(TIMM_TINY_ARGS, act_layer='gelu_tanh')


ROUND_TRIPS = {
  'vit': lambda: ('ViT-B_16', 16, dict(patch_size=4, **TINY_VIT)),
  'map-sincos': lambda: (
    'ViT-B_16',
    16,
    dict(patch_size=4, classifier='map', posemb='sincos2d', **TINY_VIT),
  ),
  # timm's R+ViT-Ti_16 (its backbone is the ResNet root alone).
  'hybrid': lambda: ('R+ViT-Ti_16', 64, dict(TINY_VIT)),
  'bit': lambda: ('BiT-R50x1', 32, dict(stage_sizes=(1, 1))),
}


@pytest.mark.parametrize('format', checkpoints.FORMATS)
@pytest.mark.parametrize('kind', list(ROUND_TRIPS))
def test_save_then_load_gives_the_same_logits(tmp_path, format, kind):
  name, size, overrides = ROUND_TRIPS[kind]()
  if kind == 'bit' and format == 'safetensors':
    overrides = {}  # timm's BiT is the registry model; keep it small:
    size = 16
  p = random_model(name, size, **overrides)
  description = checkpoints.ModelDescription(name, 5, size, overrides)
  variables = {'params': checkpoints.unflatten(p)}
  suffix = 'npz' if format == 'npz' else 'safetensors'
  path = checkpoints.save(
    tmp_path / f'out.{suffix}', variables, description, format
  )
  loaded = checkpoints.load(path)
  model = description.build()
  images = random_images((2, size, size, 3))
  want = model.apply(variables, images)
  got = loaded.model.apply(loaded.variables, images)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  (tmp_path / 'out.json').unlink()  # Without the description too.
  if format == 'safetensors':  # timm stores the fixed embedding's values.
    overrides = {k: v for k, v in overrides.items() if k != 'posemb'}
  if kind != 'map-sincos' or format == 'safetensors':
    loaded = checkpoints.load(
      path, model_name=name, image_size=size, **overrides
    )
    np.testing.assert_allclose(
      loaded.model.apply(loaded.variables, images), want, rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------
# Bad input.


def test_pytorch_pickles_are_refused(tmp_path):
  (tmp_path / 'weights.pth').write_bytes(b'\x80\x02}q\x00.')
  with pytest.raises(checkpoints.PickleRefusedError, match='safetensors'):
    checkpoints.load(tmp_path / 'weights.pth')
  snapshot = tmp_path / 'snapshot'
  snapshot.mkdir()
  (snapshot / 'pytorch_model.bin').write_bytes(b'\x80\x02}q\x00.')
  (snapshot / 'config.json').write_text('{}')
  with pytest.raises(checkpoints.PickleRefusedError, match='pytorch_model'):
    checkpoints.load(snapshot)


def test_truncated_files_are_named(tmp_path):
  p = tiny_vit()
  path = wf.write_safetensors(
    tmp_path / 'model.safetensors', wf.timm_vit(p, DEPTH)
  )
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ValueError, match=r'model\.safetensors.*truncated'):
    checkpoints.load(path, model_name='ViT-B_16', num_heads=4)


def test_a_timm_mismatch_lists_timm_names(tmp_path):
  p = tiny_vit()
  sd = wf.timm_vit(p, DEPTH)
  del sd['blocks.1.norm2.weight']
  sd['blocks.1.mlp.fc1.weight'] = sd['blocks.1.mlp.fc1.weight'][:48]
  sd['blocks.1.mlp.fc1.bias'] = sd['blocks.1.mlp.fc1.bias'][:48]
  config = timm_config('vit_base_patch16_224', 5, **TIMM_TINY_ARGS)
  path = wf.write_safetensors(tmp_path / 'model.safetensors', sd, config)
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    checkpoints.load(path)
  message = str(e.value)
  assert (
    'missing from the checkpoint (1):\n    blocks.1.norm2.weight' in message
  )
  assert (
    'blocks.1.mlp.fc1.weight: checkpoint (48, 32), model (64, 32)' in message
  )
  # Keys of timm variants this project has no counterpart for.
  sd = wf.timm_vit(p, DEPTH)
  sd['fc_norm.weight'] = sd.pop('norm.weight')
  path = wf.write_safetensors(tmp_path / 'fc' / 'model.safetensors', sd, config)
  with pytest.raises(
    checkpoints.CheckpointMismatchError, match=r'fc_norm\.weight'
  ):
    checkpoints.load(path)

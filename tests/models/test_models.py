"""The model zoo: parameter counts, shapes, numerics against numpy, options."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from configs import common as common_config
from helpers import (
  TINY_VIT,
  abstract_params,
  init_params,
  random_images,
  randomize,
)
from vit_jax import checkpoints, models
from vit_jax.models import encoder, registry

# Published parameter counts (1000 classes, 224x224).
PUBLISHED_COUNTS = {
  'ViT-Ti_16': 5_717_416,
  'ViT-S_16': 22_050_664,
  'ViT-B_16': 86_567_656,
  'ViT-B_32': 88_224_232,
  'ViT-B_8': 86_576_872,
  'ViT-L_16': 304_326_632,
  'ViT-L_32': 306_535_400,
  'ViT-H_14': 632_045_800,
  'R50+ViT-B_16': 98_659_112,
}


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# Closed-form parameter counts, written from the architecture descriptions.


def vit_encoder_count(d, m, layers, tokens):
  block = 4 * d + 4 * (d * d + d) + (d * m + m + m * d + d)
  return tokens * d + layers * block + 2 * d


def vit_count(spec, classes, image_size):
  k = spec.kwargs
  d, p = k['hidden_size'], k['patch_size']
  n = (image_size // p) ** 2
  embed = p * p * 3 * d + d
  return (
    embed
    + d  # class token
    + vit_encoder_count(d, k['mlp_dim'], k['num_layers'], n + 1)
    + d * classes
    + classes
  )


def bottleneck_count(cin, f, projection, norm_params):
  """1x1 -> 3x3 -> 1x1 convs (no bias), 3 norms, optional 1x1 projection."""
  convs = cin * f + 9 * f * f + f * 4 * f
  norms = norm_params(cin, f)
  return (
    convs
    + norms
    + (
      cin * 4 * f + (2 * 4 * f if projection == 'post' else 0)
      if projection
      else 0
    )
  )


def resnet_stages_count(stages, width, post_activation):
  total, cin = 0, width
  for s, units in enumerate(stages):
    f = width * 2**s
    for u in range(units):
      if post_activation:  # gn1, gn2, gn3 after the convs
        norms = 2 * f + 2 * f + 2 * 4 * f
        proj = u == 0 and (cin != 4 * f or s > 0)
        total += cin * f + 9 * f * f + 4 * f * f + norms
        total += (cin * 4 * f + 2 * 4 * f) if proj else 0
      else:  # pre-activation: norms on the inputs of a, b, c
        norms = 2 * cin + 2 * f + 2 * f
        total += cin * f + 9 * f * f + 4 * f * f + norms
        total += cin * 4 * f if u == 0 else 0
      cin = 4 * f
  return total, cin


def hybrid_count(spec, classes, image_size):
  k = spec.kwargs
  d, p = k['hidden_size'], k['patch_size']
  stages = k['resnet_stages']
  width = int(64 * k['resnet_width'])
  root = 7 * 7 * 3 * width + 2 * width  # conv_root (no bias), gn_root
  body, cout = resnet_stages_count(stages, width, post_activation=True)
  # Root stride 4, then 2 per stage after the first, then the patches.
  grid = image_size // (4 * 2 ** max(len(stages) - 1, 0) * p)
  n = grid * grid
  return (
    root
    + body
    + p * p * cout * d  # embedding kernel
    + d  # embedding bias
    + d  # class token
    + vit_encoder_count(d, k['mlp_dim'], k['num_layers'], n + 1)
    + d * classes
    + classes
  )


def bit_count(spec, classes):
  k = spec.kwargs
  width = 64 * k['width_factor']
  root = 7 * 7 * 3 * width
  body, cout = resnet_stages_count(
    k['stage_sizes'], width, post_activation=False
  )
  return root + body + 2 * cout + cout * classes + classes


def vitc_count(spec, classes, image_size):
  k = spec.kwargs
  d = k['hidden_size']
  stem, cin, stride = 0, 3, 1
  for features, s in k['conv_stem']:
    stem += 9 * cin * features + 2 * features  # conv (no bias) + BN scale/bias
    cin, stride = features, stride * s
  n = (image_size // stride) ** 2
  return (
    stem
    + cin * d
    + d
    + d
    + vit_encoder_count(d, k['mlp_dim'], k['num_layers'], n + 1)
    + d * classes
    + classes
  )


def formula_count(name, classes=1000, image_size=224):
  spec = models.model_spec(name)
  return {
    'vit': lambda: vit_count(spec, classes, image_size),
    'hybrid': lambda: hybrid_count(spec, classes, image_size),
    'bit': lambda: bit_count(spec, classes),
    'vitc': lambda: vitc_count(spec, classes, image_size),
  }[spec.family]()


@pytest.mark.parametrize('name', sorted(PUBLISHED_COUNTS))
def test_published_parameter_counts(name):
  params = abstract_params(models.get_model(name, 1000), 224)
  assert count(params) == PUBLISHED_COUNTS[name]


@pytest.mark.parametrize('name', models.list_models())
def test_parameter_count_matches_formula(name):
  params = abstract_params(models.get_model(name, 1000), 224)
  assert count(params) == formula_count(name)


def test_formula_agrees_with_published_counts():
  # The formulas above are checked against the published numbers too, so
  # the per-name test compares two independent derivations.
  for name, published in PUBLISHED_COUNTS.items():
    assert formula_count(name) == published, name


def test_registry_lists_every_table_row():
  expected = {
    'ViT-Ti_16', 'ViT-S_16', 'ViT-S_32', 'ViT-B_32', 'ViT-B_16', 'ViT-B_8',
    'ViT-L_32', 'ViT-L_16', 'ViT-H_14', 'R50+ViT-B_32', 'R50+ViT-B_16',
    'R50+ViT-L_32', 'R50+ViT-L_16', 'R26+ViT-S_32', 'R26+ViT-B_32',
    'R+ViT-Ti_16', 'BiT-R50x1', 'BiT-R50x2', 'BiT-R101x1',
    'BiT-R152x1', 'BiT-R152x2', 'BiT-R200x3', 'ViTc-S_16', 'ViTc-B_16',
  }  # fmt: skip
  assert expected <= set(models.list_models())


def test_unknown_name_lists_close_matches():
  with pytest.raises(KeyError, match='ViT-B_16') as e:
    models.get_model('ViT-B16')
  assert 'list_models()' in str(e.value)


@pytest.mark.parametrize(
  'alias, name',
  [
    ('B_16', 'ViT-B_16'),
    ('Ti_16', 'ViT-Ti_16'),
    ('S_32', 'ViT-S_32'),
    ('B_8', 'ViT-B_8'),
    ('R26_S_32', 'R26+ViT-S_32'),
    ('R_Ti_16', 'R+ViT-Ti_16'),
    ('R50_L_32', 'R50+ViT-L_32'),
    ('vit_base_patch16_224', 'ViT-B_16'),
    ('vit_large_patch16_384', 'ViT-L_16'),
    ('vit_tiny_patch16_224', 'ViT-Ti_16'),
    ('vit_small_patch32_224', 'ViT-S_32'),
    ('vit_huge_patch14_224', 'ViT-H_14'),
    ('vit_base_r50_s16_384', 'R50+ViT-B_16'),
    ('vit_large_r50_s32_224', 'R50+ViT-L_32'),
    ('vit_small_r26_s32_224', 'R26+ViT-S_32'),
    ('vit_base_r26_s32_224', 'R26+ViT-B_32'),
    ('vit_tiny_r_s16_p8_224', 'R+ViT-Ti_16'),
    ('resnetv2_50x1_bit', 'BiT-R50x1'),
    ('resnetv2_152x2_bit', 'BiT-R152x2'),
    ('vit_base_patch16_224.augreg_in21k_ft_in1k', 'ViT-B_16'),
  ],
)
def test_aliases_name_the_same_model(alias, name):
  assert models.model_spec(alias) == models.model_spec(name)
  assert models.model_spec(alias).name == name
  assert models.get_model(alias, 10) == models.get_model(name, 10)
  assert alias not in models.list_models()


def test_every_alias_names_a_registered_model():
  registered = set(models.list_models())
  assert set(registry.ALIASES.values()) <= registered
  assert not set(registry.ALIASES) & registered
  # The AugReg rule covers every ViT and hybrid.
  timm_prefixes = ('vit_', 'resnetv2_')
  augreg = {
    alias: name
    for alias, name in registry.ALIASES.items()
    if not alias.startswith(timm_prefixes)
  }
  families = {name: models.model_spec(name).family for name in registered}
  assert set(augreg.values()) == {
    name for name, family in families.items() if family in ('vit', 'hybrid')
  }


def test_unknown_alias_lists_close_matches():
  with pytest.raises(KeyError, match='vit_base_patch16_224') as e:
    models.get_model('vit_base_patch16_244')
  assert 'ALIASES' in str(e.value)
  with pytest.raises(KeyError, match='Unknown model'):
    models.get_model('vit_base_patch16_244.augreg_in21k')


def test_unknown_override_is_an_error():
  with pytest.raises(TypeError, match='hidden_sise'):
    models.get_model('ViT-B_16', hidden_sise=3)


# ----------------------------------------------------------------------------
# Forward shapes of every registered model (abstractly, no allocation).


def small_resolution(name):
  spec = models.model_spec(name)
  if spec.family == 'vit':
    return 2 * spec.kwargs['patch_size']
  return 64


@pytest.mark.parametrize('name', models.list_models())
def test_forward_shapes(name):
  res = small_resolution(name)
  images = jax.ShapeDtypeStruct((2, res, res, 3), jnp.float32)

  def forward(model, x):
    # One trace for both: init runs the forward pass anyway.
    return model.init_with_output(jax.random.key(0), x)[0]

  logits = jax.eval_shape(
    lambda x: forward(models.get_model(name, 7), x), images
  )
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  features = jax.eval_shape(
    lambda x: forward(models.get_model(name, None), x), images
  )
  spec = models.model_spec(name)
  width = spec.kwargs.get('hidden_size') or 2048 * spec.kwargs.get(
    'width_factor', 1
  )
  assert features.shape == (2, width)


@pytest.mark.parametrize(
  'classifier, tokens', [('token', 17), ('gap', 16), ('unpooled', 16),
                         ('token_unpooled', 17)]
)  # fmt: skip
def test_classifiers(classifier, tokens):
  model = models.get_model(
    'ViT-B_16', 5, classifier=classifier, patch_size=4, **TINY_VIT
  )
  x = jnp.zeros((2, 16, 16, 3))
  variables = nn.unbox(model.init(jax.random.key(0), x))
  posemb = variables['params']['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, tokens, 32)
  assert ('cls' in variables['params']) == (
    classifier != 'gap' and 'token' in classifier
  )
  logits = model.apply(variables, x)
  pooled = classifier in ('token', 'gap')
  assert logits.shape == ((2, 5) if pooled else (2, tokens, 5))


def test_bad_patch_size_and_classifier_errors():
  model = models.get_model('ViT-B_16', 5, patch_size=4, **TINY_VIT)
  with pytest.raises(ValueError, match='multiple of the patch size'):
    model.init(jax.random.key(0), jnp.zeros((1, 18, 18, 3)))
  model = models.get_model('ViT-B_16', 5, classifier='cls', **TINY_VIT)
  with pytest.raises(ValueError, match='Unknown classifier'):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


# ----------------------------------------------------------------------------
# Numerics against the float64 numpy reference.


def published_float64(params):
  return {
    k: v.astype(np.float64)
    for k, v in checkpoints.npz.to_published(params).items()
  }


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_vit_matches_numpy_reference(classifier):
  model = models.get_model(
    'ViT-B_16', 6, classifier=classifier, patch_size=4,
    representation_size=24, **TINY_VIT,
  )  # fmt: skip
  images = random_images((2, 16, 16, 3))
  params = randomize(init_params(model, images))
  out = jax.jit(model.apply)({'params': params}, images)
  expected = ref.vit(
    published_float64(params), np.asarray(images, np.float64), 4, 2, classifier
  )
  np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


def test_hybrid_matches_numpy_reference():
  model = models.get_model('R50+ViT-B_16', 4, resnet_stages=(1, 2), **TINY_VIT)
  images = random_images((2, 30, 30, 3))  # odd sizes exercise 'SAME' padding
  params = randomize(init_params(model, images), scale=0.05)
  out = jax.jit(model.apply)({'params': params}, images)
  expected = ref.hybrid(
    published_float64(params), np.asarray(images, np.float64), (1, 2), 2
  )
  np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3)


def test_bit_matches_numpy_reference():
  model = models.get_model('BiT-R50x1', 4, stage_sizes=(1, 2))
  images = random_images((2, 32, 32, 3))
  params = randomize(init_params(model, images), scale=0.05)
  out = jax.jit(model.apply)({'params': params}, images)
  expected = ref.bit(
    published_float64(params), np.asarray(images, np.float64), (1, 2)
  )
  np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------
# Options: scan, remat, bfloat16, dropout, attention paths, BatchNorm.


def tiny_vit_params(seed=0, **overrides):
  model = models.get_model(
    'ViT-B_16', 6, patch_size=4, **{**TINY_VIT, **overrides}
  )
  images = random_images((4, 16, 16, 3))
  params = randomize(init_params(model, images), seed)
  return model, params, images


def test_scanned_and_unrolled_give_the_same_logits():
  model, params, images = tiny_vit_params()
  scanned = model.clone(scan=True)
  target = abstract_params(scanned, 16)
  scanned_params = checkpoints.fit_to_model(params, target)
  assert scanned_params['Transformer']['encoderblock']['MlpBlock_3'][
    'Dense_0']['kernel'].shape == (2, 32, 64)  # fmt: skip
  np.testing.assert_allclose(
    model.apply({'params': params}, images),
    scanned.apply({'params': scanned_params}, images),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize(
  'policy, scan', [('nothing_saveable', True), ('dots_saveable', False)]
)
def test_remat_keeps_values_and_gradients(policy, scan):
  model, params, images = tiny_vit_params(scan=scan)
  if scan:
    params = checkpoints.fit_to_model(params, abstract_params(model, 16))
  remat = model.clone(remat_policy=policy)

  def loss(m, p):
    return jnp.sum(m.apply({'params': p}, images) ** 2)

  g_ref = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
  g = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_logits_close_to_float32():
  # A real-sized model (ViT-S/16) at its initialisation with a random head
  # (a zero head gives zero logits), on images with 8-bit pixel levels.
  model = models.get_model('ViT-S_16', 10)
  images = jnp.round((random_images((8, 64, 64, 3)) + 1) * 127.5) / 127.5 - 1
  params = init_params(model, images)
  params['head'] = randomize(params['head'], scale=0.05)
  f32 = jax.jit(model.apply)({'params': params}, images)
  bf16 = jax.jit(model.clone(dtype='bfloat16').apply)(
    {'params': params}, images
  )
  assert bf16.dtype == jnp.float32
  rel = jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32)
  assert rel < 1e-2, rel


def test_bfloat16_matmuls_accumulate_in_float32():
  model, params, images = tiny_vit_params()
  hlo = (
    jax.jit(model.clone(dtype='bfloat16').apply)
    .lower({'params': params}, images)
    .as_text()
  )
  # Every dot outputs f32. The encoder's dense layers and the patch
  # embedding (a product on CPUs: patches (B, N, p, p, 3) contracted with
  # the kernel) are the dots without batch dimensions (the batched ones are
  # inside jax.nn.dot_product_attention) and take bf16 operands: no bf16 ->
  # bf16 matmul. The head runs in float32.
  dots = [
    line
    for line in hlo.splitlines()
    if 'stablehlo.dot_general' in line and 'batching_dims' not in line
  ]
  bf16_dots = [line for line in dots if 'bf16' in line.split('->')[0]]
  embedding = [d for d in bf16_dots if '[2, 3, 4] x [0, 1, 2]' in d]
  assert len(embedding) == 1
  assert len(bf16_dots) == 1 + 2 * 6  # 2 blocks x (q, k, v, out, 2 MLP)
  for line in dots:
    assert 'f32' in line.split('->')[-1], line


def test_dropout_only_in_training():
  model, params, images = tiny_vit_params(
    dropout_rate=0.3, attention_dropout_rate=0.3
  )
  variables = {'params': params}
  eval_a = model.apply(variables, images)
  eval_b = model.apply(variables, images, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train = [
    model.apply(
      variables, images, train=True, rngs={'dropout': jax.random.key(s)}
    )
    for s in (0, 1)
  ]
  assert not np.allclose(train[0], train[1])
  assert not np.allclose(train[0], eval_a)


def test_explicit_attention_path_equals_fused_path():
  model, params, images = tiny_vit_params()
  fused = model.apply({'params': params}, images)
  explicit, state = model.apply(
    {'params': params}, images, mutable=['intermediates']
  )
  np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-5)
  weights = state['intermediates']['Transformer']['encoderblock_0'][
    'MultiHeadDotProductAttention_1']['attention_weights'][0]  # fmt: skip
  assert weights.shape == (4, 4, 17, 17)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


def test_vitc_batch_norm_statistics_over_the_global_batch():
  """Sharding the batch over devices must not change BatchNorm statistics."""
  model = models.get_model(
    'ViTc-S_16', 3, conv_stem=((8, 2), (16, 2)), hidden_size=32, mlp_dim=64,
    num_heads=4, num_layers=1,
  )  # fmt: skip
  images = random_images((8, 16, 16, 3))
  variables = nn.unbox(model.init(jax.random.key(0), images))

  def train_forward(v, x):
    return model.apply(v, x, train=True, mutable=['batch_stats'])

  ref_out, ref_stats = train_forward(variables, images)
  # Reference statistics of the first BatchNorm over the whole batch.
  conv = jax.lax.conv_general_dilated(
    images, variables['params']['stem_conv0']['kernel'], (2, 2),
    ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )  # fmt: skip
  np.testing.assert_allclose(
    ref_stats['batch_stats']['stem_bn0']['mean'], 0.1 * conv.mean((0, 1, 2)),
    rtol=1e-4, atol=1e-6,
  )  # fmt: skip

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  out, stats = jax.jit(train_forward)(variables, jax.device_put(images, batch))
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for a, b in zip(
    jax.tree.leaves(stats), jax.tree.leaves(ref_stats), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  # Inside shard_map each device sees 1 image; bn_axis_name makes the
  # statistics global again.
  p = jax.sharding.PartitionSpec
  synced = model.clone(bn_axis_name='data')
  per_device = jax.shard_map(
    lambda v, x: synced.apply(v, x, train=True, mutable=['batch_stats']),
    mesh=mesh, in_specs=(p(), p('data')), out_specs=(p('data'), p()),
  )  # fmt: skip
  out, stats = jax.jit(per_device)(variables, images)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for a, b in zip(
    jax.tree.leaves(stats), jax.tree.leaves(ref_stats), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# The AugReg hybrids.


def r26_body_count():
  """ResNet-26 body of post-activation units: (2, 2, 2, 2), width 64.

  A unit of input width c and width f has convs c*f (1x1) + 9f^2 (3x3) +
  4f^2 (1x1 to 4f), GroupNorms 2f + 2f + 8f, and, in each stage's first
  unit, a 1x1 projection c*4f with its GroupNorm 8f.
  """

  def unit(c, f, projection):
    convs = c * f + 9 * f * f + f * 4 * f
    norms = 2 * f + 2 * f + 2 * 4 * f
    return convs + norms + (c * 4 * f + 2 * 4 * f if projection else 0)

  return (
    unit(64, 64, True) + unit(256, 64, False)
    + unit(256, 128, True) + unit(512, 128, False)
    + unit(512, 256, True) + unit(1024, 256, False)
    + unit(1024, 512, True) + unit(2048, 512, False)
  )  # fmt: skip


def augreg_hybrid_count(d, m, layers, body, channels, patch):
  """Root + body + patch embedding + ViT-{size} on 7x7 + 1 tokens + head."""
  root = 7 * 7 * 3 * 64 + 2 * 64  # conv_root (no bias), gn_root
  embedding = patch * patch * channels * d + d
  tokens = 7 * 7 + 1  # 224 / 32 = 7 patches a side, and the class token
  block = (
    2 * 2 * d  # LayerNorm_0, LayerNorm_2
    + 3 * (d * d + d)  # query, key, value
    + d * d + d  # out
    + d * m + m + m * d + d  # MlpBlock_3
  )  # fmt: skip
  encoder = tokens * d + layers * block + 2 * d  # posemb, blocks, final LN
  return root + body + embedding + d + encoder + d * 1000 + 1000


@pytest.mark.parametrize(
  'name, expected',
  [
    ('R26+ViT-S_32', lambda: augreg_hybrid_count(
      384, 1536, 12, r26_body_count(), 2048, 1)),
    ('R26+ViT-B_32', lambda: augreg_hybrid_count(
      768, 3072, 12, r26_body_count(), 2048, 1)),
    ('R+ViT-Ti_16', lambda: augreg_hybrid_count(192, 768, 12, 0, 64, 8)),
  ],
)  # fmt: skip
def test_augreg_hybrids_tokens_and_parameter_counts(name, expected):
  params = abstract_params(models.get_model(name, 1000), 224)
  assert count(params) == expected()
  width = models.model_spec(name).kwargs['hidden_size']
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 50, width)
  assert ('block1' in params) == (name != 'R+ViT-Ti_16')


def test_root_only_hybrid_matches_numpy_reference():
  model = models.get_model(
    'R+ViT-Ti_16', 4, patch_size=2, resnet_width=0.5, **TINY_VIT
  )
  images = random_images((2, 30, 30, 3))  # 'SAME' padding of odd sizes
  params = randomize(init_params(model, images), scale=0.05)
  assert params['conv_root']['kernel'].shape == (7, 7, 3, 32)
  out = jax.jit(model.apply)({'params': params}, images)
  expected = ref.hybrid(
    published_float64(params), np.asarray(images, np.float64), (), 2, patch=2
  )
  np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------
# Options for weights trained elsewhere: exact GELU, MAP head, sin-cos
# position embedding. Each against the float64 numpy reference.


def reference_check(image_shape=(2, 16, 16, 3), **options):
  """Max |model - numpy reference| of a tiny float32 ViT with `options`."""
  model = models.get_model(
    'ViT-B_16', 6, patch_size=4, representation_size=24,
    **{**TINY_VIT, **options},
  )  # fmt: skip
  images = random_images(image_shape)
  params = randomize(init_params(model, images))
  out = jax.jit(model.apply)({'params': params}, images)
  expected = ref.vit(
    published_float64(params), np.asarray(images, np.float64), 4, 2,
    classifier=options.get('classifier', 'token'),
    gelu_approximate=options.get('gelu_approximate', True),
    posemb=options.get('posemb', 'learn'),
  )  # fmt: skip
  return float(np.max(np.abs(np.asarray(out, np.float64) - expected))), params


@pytest.mark.parametrize(
  'options',
  [
    dict(gelu_approximate=False),
    dict(classifier='map'),
    dict(posemb='sincos2d'),
    dict(posemb='sincos2d', classifier='gap'),
    dict(posemb='sincos2d', classifier='map', gelu_approximate=False),
  ],
  ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()),
)
def test_weight_compatibility_options_match_numpy_reference(options):
  # A 16x24 image: a 4x6 patch grid tells rows from columns.
  diff, _ = reference_check((2, 16, 24, 3), **options)
  assert diff <= 1e-4, diff


def test_exact_and_tanh_gelu_differ_beyond_the_tolerance():
  # Otherwise the GELU test above could not tell them apart.
  x = np.linspace(-4, 4, 101)
  assert np.max(np.abs(ref.gelu_exact(x) - ref.gelu_tanh(x))) > 1e-4
  images = np.asarray(random_images((2, 16, 16, 3)), np.float64)
  _, params = reference_check(gelu_approximate=False)
  exact, tanh = (
    ref.vit(published_float64(params), images, 4, 2, gelu_approximate=approx)
    for approx in (False, True)
  )
  # 3.8e-4: over twice the tolerance (the model's error is about 1e-6).
  assert np.max(np.abs(exact - tanh)) > 2e-4


def test_map_head_parameters_are_big_visions():
  model = models.get_model(
    'ViT-B_16', 5, classifier='map', patch_size=4, **TINY_VIT
  )
  params = abstract_params(model, 16)
  assert 'cls' not in params
  head = jax.tree.map(lambda x: x.shape, params['MAPHead_0'])
  assert head == {
    'probe': (1, 1, 32),
    'MultiHeadDotProductAttention_0': {
      'query': {'kernel': (32, 4, 8), 'bias': (4, 8)},
      'key': {'kernel': (32, 4, 8), 'bias': (4, 8)},
      'value': {'kernel': (32, 4, 8), 'bias': (4, 8)},
      'out': {'kernel': (4, 8, 32), 'bias': (32,)},
    },
    'LayerNorm_0': {'scale': (32,), 'bias': (32,)},
    'MlpBlock_0': {
      'Dense_0': {'kernel': (32, 64), 'bias': (64,)},
      'Dense_1': {'kernel': (64, 32), 'bias': (32,)},
    },
  }
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 16, 32)  # no class token


def test_sincos_posemb_values_and_no_parameter():
  got = encoder.posemb_sincos_2d(3, 5, 16)
  np.testing.assert_allclose(got, ref.posemb_sincos_2d(3, 5, 16), atol=1e-6)
  # Token 6 is row 1, column 1; token 1 row 0, column 1. Frequency 0 is 1.
  np.testing.assert_allclose(got[0, 1, [0, 4, 8, 12]], [np.sin(1), np.cos(1),
                             0, 1], atol=1e-6)  # fmt: skip
  np.testing.assert_allclose(got[0, 5, [0, 4, 8, 12]], [0, 1, np.sin(1),
                             np.cos(1)], atol=1e-6)  # fmt: skip
  model = models.get_model(
    'ViT-B_16', 5, posemb='sincos2d', patch_size=4, **TINY_VIT
  )
  params = abstract_params(model, 16)
  assert 'posembed_input' not in params['Transformer']
  assert params['cls'].shape == (1, 1, 32)


def test_bad_posemb_errors():
  model = models.get_model('ViT-B_16', 5, posemb='sincos', **TINY_VIT)
  with pytest.raises(ValueError, match="Unknown posemb 'sincos'"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  model = models.get_model(
    'ViT-B_16', 5, posemb='sincos2d', hidden_size=30, num_heads=3,
    mlp_dim=8, num_layers=1,
  )  # fmt: skip
  with pytest.raises(ValueError, match='divisible by 4'):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_model_options_from_config():
  config = common_config.base()
  config.model.attention = 'xla'
  config.model.gelu_approximate = False
  config.model.posemb = 'sincos2d'
  config.model.classifier = 'map'
  config.model.resnet_stages = (1, 1)
  config.model.resnet_width = 0.5
  model = models.get_model(
    'R+ViT-Ti_16', 3, **models.config_overrides(config.model)
  )
  assert (model.attention, model.gelu_approximate, model.posemb) == (
    'xla', False, 'sincos2d'
  )  # fmt: skip
  assert tuple(model.resnet_stages) == (1, 1) and model.resnet_width == 0.5
  params = abstract_params(model, 64)
  assert params['block2']['unit1']['conv1']['kernel'].shape == (1, 1, 128, 64)
  assert 'MAPHead_0' in params

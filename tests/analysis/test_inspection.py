"""Inspection: attention distance, rollout and figures on tiny models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import image as mpimg
from sklearn import decomposition

from vit_jax.analysis import attention_maps, inspection
from vit_jax.models import get_model, shapes

TINY_VIT = dict(
  hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2, patch_size=4
)
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _init(model, size):
  """Random parameters of the model's shapes (numpy: nothing to compile)."""
  images = jax.random.uniform(
    jax.random.key(1), (3, size, size, 3), minval=-1.0, maxval=1.0
  )
  shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1])
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda x: rng.normal(scale=0.3, size=x.shape).astype(np.float32),
    nn.meta.unbox(shapes),
  )
  return variables, images


def _sown_attention(model, variables, images):
  """(layers, batch, heads, q, k) float64, read directly from the model."""
  apply = jax.jit(lambda v, x: model.apply(v, x, mutable=['intermediates']))
  _, state = apply(variables, images)
  encoder = state['intermediates']['Transformer']
  return np.stack(
    [
      np.asarray(
        encoder[f'encoderblock_{i}']['MultiHeadDotProductAttention_1'][
          'attention_weights'
        ][0],
        np.float64,
      )
      for i in range(model.num_layers)
    ]
  )


def _reference_distance(weights, grid, stride, skip):
  coords = [(r, c) for r in range(grid) for c in range(grid)]
  dist = np.array(
    [
      [stride * np.hypot(r - r2, c - c2) for r2, c2 in coords]
      for r, c in coords
    ]
  )
  per_query = (weights[..., skip:, skip:] * dist).sum(axis=-1)
  return per_query.mean(axis=(1, 3))


def _assert_png_with_content(path):
  data = path.read_bytes()
  assert data.startswith(PNG_SIGNATURE)
  pixels = mpimg.imread(path)
  colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
  assert len(colours) > 1


def _uniform_attention(variables):
  """Zero query/key projections: softmax(0) is uniform in every layer."""
  params = variables['params']
  for name, block in params['Transformer'].items():
    if name.startswith('encoderblock_'):
      attention = block['MultiHeadDotProductAttention_1']
      for proj in ('query', 'key'):
        attention[proj] = jax.tree.map(jnp.zeros_like, attention[proj])
  return variables


def test_attention_rollout_of_hand_made_matrices():
  eye = np.eye(3)
  shift = np.roll(eye, 1, axis=1)  # token i attends to token i + 1
  uniform = np.full((3, 3), 1 / 3)
  # (layers=2, batch=1, heads=2, 3, 3)
  attentions = np.array([[[eye, shift]], [[uniform, uniform]]])
  # Layer 1: heads average to (I + S)/2, so Ã1 = 0.75 I + 0.25 S.
  # Layer 2: Ã2 = 0.5 U + 0.5 I. R = Ã2 Ã1 = 0.5 U + 0.375 I + 0.125 S
  # (U S = U).
  expected = 0.5 * uniform + 0.375 * eye + 0.125 * shift
  np.testing.assert_allclose(
    attention_maps.attention_rollout(attentions)[0], expected, atol=1e-12
  )


def test_uniform_attention_gives_hand_computed_distance_and_rollout():
  model = get_model('ViT-B_16', 10, **TINY_VIT)
  variables, images = _init(model, 8)  # a 2x2 grid of 4-pixel patches
  variables = _uniform_attention(variables)
  # Every token attends 1/5 to each of the class token and 4 patches; a
  # patch's distances to the patches are 0, 4, 4 and 4·√2 pixels.
  distances = attention_maps.mean_attention_distance(model, variables, images)
  np.testing.assert_allclose(
    distances, np.full((2, 4), (8 + 4 * np.sqrt(2)) / 5), rtol=1e-6
  )
  # Ã = 0.5 U + 0.5 I in both layers: R = 0.75 U + 0.25 I, so the class
  # token's row gives 0.75 / 5 to every patch.
  maps = attention_maps.rollout_maps(model, variables, images)
  np.testing.assert_allclose(maps, np.full((3, 2, 2), 0.15), rtol=1e-6)


@pytest.mark.parametrize(
  ('name', 'overrides', 'size', 'grid', 'stride', 'skip'),
  [
    ('ViT-B_16', dict(TINY_VIT), 16, 4, 4, 1),
    ('ViT-B_16', dict(TINY_VIT, classifier='gap'), 16, 4, 4, 0),
    # Root stride 4 and one stage: 1x1 tokens on a /4 feature map.
    (
      'R50+ViT-B_16',
      dict(TINY_VIT, patch_size=1, resnet_stages=(1,), resnet_width=0.5),
      24,
      6,
      4,
      1,
    ),
  ],
)
def test_mean_attention_distance_matches_numpy(
  name, overrides, size, grid, stride, skip
):
  model = get_model(name, 10, **overrides)
  variables, images = _init(model, size)
  assert shapes.token_grid(model, size, size) == (grid, grid, stride)
  weights = _sown_attention(model, variables, images)
  expected = _reference_distance(weights, grid, stride, skip)
  distances = attention_maps.mean_attention_distance(
    model, variables, images, batch_size=2
  )
  assert distances.shape == (2, 4)
  np.testing.assert_allclose(distances, expected, rtol=1e-5)


def test_rollout_maps_match_numpy():
  model = get_model('ViT-B_16', 10, **TINY_VIT)
  variables, images = _init(model, 16)
  weights = _sown_attention(model, variables, images)
  expected = []
  for b in range(len(images)):
    rollout = np.eye(17)
    for layer in weights[:, b]:
      mixed = 0.5 * layer.mean(axis=0) + 0.5 * np.eye(17)
      mixed = mixed / mixed.sum(axis=1, keepdims=True)
      rollout = mixed @ rollout
    expected.append(rollout[0, 1:].reshape(4, 4))
  maps = attention_maps.rollout_maps(model, variables, images, batch_size=2)
  np.testing.assert_allclose(maps, np.array(expected), rtol=1e-5)


def test_rollout_needs_a_class_token():
  model = get_model('ViT-B_16', 10, **dict(TINY_VIT, classifier='gap'))
  variables, images = _init(model, 16)
  with pytest.raises(ValueError, match='class token'):
    attention_maps.rollout_maps(model, variables, images)


def test_scanned_and_unrolled_models_give_the_same_distances():
  unrolled = get_model('ViT-B_16', 10, **TINY_VIT)
  variables, images = _init(unrolled, 16)
  params = dict(variables['params'])
  encoder = dict(params['Transformer'])
  blocks = [encoder.pop(f'encoderblock_{i}') for i in range(2)]
  encoder['encoderblock'] = jax.tree.map(lambda *x: jnp.stack(x), *blocks)
  params['Transformer'] = encoder
  scanned = get_model('ViT-B_16', 10, scan=True, **TINY_VIT)
  np.testing.assert_allclose(
    attention_maps.mean_attention_distance(scanned, {'params': params}, images),
    attention_maps.mean_attention_distance(unrolled, variables, images),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    attention_maps.rollout_maps(scanned, {'params': params}, images),
    attention_maps.rollout_maps(unrolled, variables, images),
    rtol=1e-5,
  )


def test_token_grid_of_full_size_hybrids_and_vitc():
  assert shapes.token_grid(get_model('R50+ViT-B_16'), 224, 224) == (
    14,
    14,
    16,
  )
  assert shapes.token_grid(get_model('R50+ViT-B_32'), 224, 224) == (
    7,
    7,
    32,
  )
  assert shapes.token_grid(get_model('ViTc-S_16'), 224, 224) == (14, 14, 16)
  with pytest.raises(TypeError, match='no patch tokens'):
    shapes.token_grid(get_model('BiT-R50x1'), 224, 224)


def test_embedding_filters_figure(tmp_path):
  model = get_model('ViT-B_16', 10, **TINY_VIT)
  variables, _ = _init(model, 16)
  path = tmp_path / 'filters.png'
  components = inspection.embedding_filters_figure(variables, path)
  _assert_png_with_content(path)
  # Against scikit-learn's PCA of the 32 filters of length 4·4·3.
  kernel = np.asarray(variables['params']['embedding']['kernel'], np.float64)
  pca = decomposition.PCA(n_components=28).fit(kernel.reshape(48, 32).T)
  ours = components.reshape(28, 48)
  np.testing.assert_allclose(
    np.abs(np.sum(ours * pca.components_, axis=1)), 1.0, atol=1e-6
  )


def test_embedding_filters_figure_rejects_a_1x1_embedding(tmp_path):
  params = {'embedding': {'kernel': np.zeros((1, 1, 1024, 32))}}
  with pytest.raises(ValueError, match='hybrid'):
    inspection.embedding_filters_figure(params, tmp_path / 'x.png')


def test_position_similarity_figure(tmp_path):
  model = get_model('ViT-B_16', 10, **TINY_VIT)
  variables, _ = _init(model, 16)
  path = tmp_path / 'posemb.png'
  similarity = inspection.position_similarity_figure(
    variables['params'], path, has_class_token=True
  )
  _assert_png_with_content(path)
  posemb = np.asarray(
    variables['params']['Transformer']['posembed_input']['pos_embedding']
  )[0, 1:]
  a, b = posemb[1 * 4 + 2], posemb[3 * 4 + 0]  # patches (1, 2) and (3, 0)
  cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  assert similarity.shape == (4, 4, 4, 4)
  assert similarity[1, 2, 3, 0] == pytest.approx(cosine, rel=1e-5)
  np.testing.assert_allclose(
    similarity.reshape(16, 16).diagonal(), 1.0, rtol=1e-6
  )
  with pytest.raises(ValueError, match='square grid'):
    inspection.position_similarity_figure(
      variables['params'], path, has_class_token=False
    )


def test_distance_and_rollout_figures(tmp_path):
  model = get_model('ViT-B_16', 10, **TINY_VIT)
  variables, images = _init(model, 16)
  distances = attention_maps.mean_attention_distance(model, variables, images)
  inspection.attention_distance_figure(distances, tmp_path / 'distance.png')
  _assert_png_with_content(tmp_path / 'distance.png')
  maps = attention_maps.rollout_maps(model, variables, images)
  inspection.rollout_figure(images, maps, tmp_path / 'nested' / 'rollout.png')
  _assert_png_with_content(tmp_path / 'nested' / 'rollout.png')

"""Few-shot least-squares probe: solver, sampling and a real probe."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets, linear_model

from vit_jax.evaluators import fewshot
from vit_jax.models import get_model

TINY_VIT = dict(
  hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2, patch_size=4
)


@pytest.mark.parametrize(('num_points', 'dim'), [(50, 20), (20, 50)])
def test_least_squares_solves_the_regularised_normal_equations(num_points, dim):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(num_points, dim))
  y = np.sign(rng.normal(size=(num_points, 3)))
  l2_reg = 0.7
  expected = np.linalg.solve(x.T @ x + l2_reg * np.eye(dim), x.T @ y)
  np.testing.assert_allclose(
    fewshot.least_squares(x, y, l2_reg), expected, rtol=1e-10, atol=1e-12
  )


def test_least_squares_rejects_a_nonpositive_penalty():
  with pytest.raises(ValueError, match='l2_reg must be positive'):
    fewshot.least_squares(np.ones((2, 2)), np.ones((2, 1)), 0.0)


@pytest.mark.parametrize('num_train', [40, 8])  # N >= D and N < D.
def test_probe_matches_ridge_regression_on_standardised_features(num_train):
  rng = np.random.default_rng(1)
  train = rng.normal(size=(num_train, 12)) * 3 + 5
  test = rng.normal(size=(30, 12)) * 3 + 5
  train_labels = np.arange(num_train) % 4
  test_labels = rng.integers(0, 4, size=30)
  l2_reg = 2.0

  # Reference: scikit-learn's ridge on the same standardised features with a
  # constant column of 100.
  mean, std = train.mean(0), train.std(0) + 1e-5

  def prepare(x):
    return np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])

  ridge = linear_model.Ridge(alpha=l2_reg, fit_intercept=False)
  ridge.fit(prepare(train), 2 * np.eye(4)[train_labels] - 1)
  expected = np.mean(ridge.predict(prepare(test)).argmax(1) == test_labels)

  accuracy = fewshot.linear_probe_accuracy(
    train, train_labels, test, test_labels, 4, l2_reg
  )
  assert accuracy == pytest.approx(expected)


def test_few_shot_indices_take_k_per_class_and_depend_on_the_seed():
  labels = np.repeat(np.arange(5), 30)
  np.random.default_rng(0).shuffle(labels)
  first = fewshot.few_shot_indices(labels, (1, 5, 10), seed=0, num_classes=5)
  for k, idx in first.items():
    assert len(set(idx.tolist())) == len(idx)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=5), k)
  # Nested: the 5-shot set contains the 1-shot set.
  assert set(first[1]) <= set(first[5]) <= set(first[10])
  # Deterministic per seed, different across seeds.
  again = fewshot.few_shot_indices(labels, (10,), seed=0, num_classes=5)
  np.testing.assert_array_equal(again[10], first[10])
  other = fewshot.few_shot_indices(labels, (10,), seed=1, num_classes=5)
  assert set(other[10]) != set(first[10])


def test_few_shot_indices_report_classes_that_are_too_small():
  labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
  with pytest.raises(ValueError, match=r'5-shot.*\{1: 3\}'):
    fewshot.few_shot_indices(labels, (1, 5), seed=0, num_classes=3)


def _digits():
  """scikit-learn's 8x8 digits as 16x16 RGB images in [-1, 1], split."""
  digits = datasets.load_digits()
  images = digits.images / 8.0 - 1.0  # pixel values are 0..16
  images = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
  images = np.repeat(images[..., None], 3, axis=-1).astype(np.float32)
  return (
    images[:1000],
    digits.target[:1000],
    images[1000:],
    digits.target[1000:],
  )


def _batches(images, labels, batch_size):
  """Fixed-size batches; the last is padded and masked."""
  for start in range(0, len(images), batch_size):
    x = images[start : start + batch_size]
    y = labels[start : start + batch_size]
    pad = batch_size - len(x)
    yield dict(
      images=np.pad(x, ((0, pad), (0, 0), (0, 0), (0, 0))),
      labels=np.pad(y, (0, pad)),
      mask=np.pad(np.ones(len(x), np.float32), (0, pad)),
    )


def test_raw_pixel_probe_on_digits_beats_chance():
  train_x, train_y, test_x, test_y = _digits()
  accuracy = fewshot.fewshot_evaluate(
    train_x.reshape(len(train_x), -1),
    train_y,
    test_x.reshape(len(test_x), -1),
    test_y,
    shots=(1, 10),
    seeds=2,
  )
  assert set(accuracy) == {1, 10}
  assert accuracy[10] > 0.7  # chance is 0.1
  assert accuracy[10] > accuracy[1]


def test_pre_logits_features_of_a_tiny_vit_on_digits():
  train_x, train_y, test_x, test_y = _digits()
  classifier = get_model('ViT-B_16', 10, **TINY_VIT)
  variables = nn.meta.unbox(
    jax.jit(classifier.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  )
  # A non-zero head, so that the logits depend on it.
  head = variables['params']['head']
  rng = np.random.default_rng(0)
  head['kernel'] = jnp.asarray(rng.normal(size=head['kernel'].shape))
  head['bias'] = jnp.asarray(rng.normal(size=head['bias'].shape))

  feature_fn = fewshot.pre_logits_fn('ViT-B_16', **TINY_VIT)
  train_f, train_l = fewshot.extract_features(
    feature_fn, variables, _batches(train_x, train_y, 128)
  )
  test_f, test_l = fewshot.extract_features(
    feature_fn, variables, _batches(test_x, test_y, 128)
  )
  # Padding dropped, labels kept in order.
  assert train_f.shape == (1000, 32) and test_f.shape == (797, 32)
  np.testing.assert_array_equal(train_l, train_y)
  np.testing.assert_array_equal(test_l, test_y)
  # The features are what the head sees: logits = features @ W + b.
  logits = classifier.apply(variables, jnp.asarray(test_x[:16]))
  np.testing.assert_allclose(
    logits,
    test_f[:16] @ np.asarray(head['kernel']) + np.asarray(head['bias']),
    rtol=1e-4,
    atol=1e-4,
  )
  accuracy = fewshot.fewshot_evaluate(
    train_f, train_l, test_f, test_l, shots=(10,), seeds=2
  )
  # Chance is 0.1. Random attention mostly averages the patches, so an
  # untrained ViT keeps less of the digit than the raw pixels do (> 0.7).
  assert accuracy[10] > 0.25


def test_extract_features_reads_one_hot_labels():
  images = np.zeros((4, 16, 16, 3), np.float32)
  batches = [
    dict(
      images=images,
      labels=np.eye(3)[[2, 0, 1, 1]],
      mask=np.array([1, 1, 1, 0]),
    )
  ]
  features, labels = fewshot.extract_features(
    lambda variables, x: x.reshape(len(x), -1)[:, :2], None, batches
  )
  assert features.shape == (3, 2)
  np.testing.assert_array_equal(labels, [2, 0, 1])

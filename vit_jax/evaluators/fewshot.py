"""Few-shot linear evaluation on frozen features (paper §4, App. D).

The paper's cheap proxy for fine-tuning: a regularised least-squares fit of
frozen representations of k images per class to {-1, +1} targets, solved
exactly in closed form. This follows big_vision's `fewshot_lsr` evaluator:
- features are the pre-logits output of the model;
- each feature is standardised with the mean and standard deviation
  (population, + 1e-5) of the k-shot training set, and a constant feature of
  100 is appended, so that the bias is almost unregularised;
- targets are 2·onehot - 1; w = (XᵀX + λI)⁻¹Xᵀy, solved in the dual form
  Xᵀ(XXᵀ + λI)⁻¹y when there are fewer examples than features;
- prediction is the argmax over classes;
- for each seed, every class's training examples are permuted once and the
  first k are taken for every k (so the 5-shot set contains the 1-shot
  set); accuracies are averaged over seeds.

The solve is done in numpy float64.
"""

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from vit_jax.models import get_model

# A constant feature this large makes the bias's weight almost free of the
# L2 penalty (big_vision's BIAS_CONSTANT).
BIAS_FEATURE = 100.0
STD_EPS = 1e-5
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = 3
DEFAULT_L2_REG = 2.0**10


def least_squares(x: np.ndarray, y: np.ndarray, l2_reg: float) -> np.ndarray:
  """argmin_w ||xw - y||² + l2_reg·||w||², in closed form and float64.

  Args:
    x: (N, D) inputs.
    y: (N, C) targets.
    l2_reg: the ridge penalty λ > 0.

  Returns:
    (D, C) weights: (xᵀx + λI)⁻¹xᵀy when N >= D, else the equal dual form
    xᵀ(xxᵀ + λI)⁻¹y, which solves an N x N system instead of a D x D one.
  """
  if l2_reg <= 0:
    raise ValueError(f'l2_reg must be positive, got {l2_reg}.')
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  num_points, dim = x.shape
  if num_points >= dim:
    return np.linalg.solve(x.T @ x + l2_reg * np.eye(dim), x.T @ y)
  return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(num_points), y)


def linear_probe_accuracy(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  num_classes: int,
  l2_reg: float = DEFAULT_L2_REG,
) -> float:
  """Test accuracy of the least-squares probe fitted on the train set."""
  train = np.asarray(train_features, np.float64)
  test = np.asarray(test_features, np.float64)
  mean = train.mean(axis=0)
  std = train.std(axis=0) + STD_EPS

  def prepare(x):
    x = (x - mean) / std
    return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_FEATURE)

  targets = 2.0 * np.eye(num_classes)[np.asarray(train_labels)] - 1.0
  weights = least_squares(prepare(train), targets, l2_reg)
  predictions = np.argmax(prepare(test) @ weights, axis=1)
  return float(np.mean(predictions == np.asarray(test_labels)))


def few_shot_indices(
  labels: np.ndarray, shots: Sequence[int], seed: int, num_classes: int
) -> dict[int, np.ndarray]:
  """Indices of k training examples per class, for every k in `shots`.

  One random permutation of each class's examples per seed; the k-shot set
  is its first k, so the sets are nested.

  Raises:
    ValueError: if a class has fewer examples than the largest k.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  per_class = [
    rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)
  ]
  most = max(shots)
  short = {c: len(idx) for c, idx in enumerate(per_class) if len(idx) < most}
  if short:
    raise ValueError(
      f'{most}-shot evaluation needs {most} training examples of every '
      f'class, but these classes have fewer ({{class: count}}): {short}. Use '
      'fewer shots or a larger training split.'
    )
  return {k: np.concatenate([idx[:k] for idx in per_class]) for k in shots}


def fewshot_evaluate(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  shots: Sequence[int] = DEFAULT_SHOTS,
  seeds: int | Sequence[int] = DEFAULT_SEEDS,
  l2_reg: float = DEFAULT_L2_REG,
  num_classes: int | None = None,
) -> dict[int, float]:
  """Mean few-shot accuracy over seeds, for every number of shots.

  Args:
    train_features: (N, D) features of the pool the shots are drawn from.
    train_labels: (N,) integer labels.
    test_features: (M, D) features of the evaluation set.
    test_labels: (M,) integer labels.
    shots: examples per class to fit on.
    seeds: the number of seeds (0, 1, ...) or the seeds themselves.
    l2_reg: the ridge penalty λ.
    num_classes: number of classes; by default 1 + the largest label.

  Returns:
    {k: accuracy in [0, 1], averaged over seeds}.
  """
  train_labels = np.asarray(train_labels)
  test_labels = np.asarray(test_labels)
  if num_classes is None:
    num_classes = 1 + int(max(train_labels.max(), test_labels.max()))
  if isinstance(seeds, int):
    seeds = range(seeds)
  accuracies = {k: [] for k in shots}
  for seed in seeds:
    for k, idx in few_shot_indices(
      train_labels, shots, seed, num_classes
    ).items():
      accuracies[k].append(
        linear_probe_accuracy(
          train_features[idx],
          train_labels[idx],
          test_features,
          test_labels,
          num_classes,
          l2_reg,
        )
      )
  return {k: float(np.mean(accs)) for k, accs in accuracies.items()}


def pre_logits_fn(
  model_name: str, **overrides
) -> Callable[[Any, jax.Array], jax.Array]:
  """A feature function (variables, images) -> pre-logits features.

  The model is built without a head (`num_classes=None`), so applying it
  to a classifier's variables returns what the head would see; the head's
  parameters are simply unused.
  """
  module = get_model(model_name, None, **overrides)

  def features(variables, images):
    return module.apply(variables, images, train=False)

  return features


def extract_features(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  variables: Any,
  batches: Iterable[Mapping[str, Any]],
) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of every real example of a stream of batches.

  Args:
    apply_fn: (variables, images) -> (batch, D) features, e.g. from
      `pre_logits_fn`; it is jitted here.
    variables: the model's variables.
    batches: dicts with 'images', 'labels' (integers, or one-hot rows) and
      'mask' (1 for real examples, 0 for padding, which is dropped).

  Returns:
    (features float32 (N, D), labels int64 (N,)) as numpy arrays.
  """
  apply_fn = jax.jit(apply_fn)
  features, labels = [], []
  for batch in batches:
    keep = np.asarray(batch['mask']) > 0
    batch_labels = np.asarray(batch['labels'])
    if batch_labels.ndim == 2:
      batch_labels = batch_labels.argmax(axis=1)
    batch_features = np.asarray(apply_fn(variables, batch['images']))
    features.append(batch_features[keep].astype(np.float32))
    labels.append(batch_labels[keep].astype(np.int64))
  if not features:
    raise ValueError('extract_features got no batches.')
  return np.concatenate(features), np.concatenate(labels)


def metric_name(dataset: str, shots: int) -> str:
  """'<dataset>_<k>shot', the dataset's name made identifier-safe."""
  safe = re.sub(r'[^0-9A-Za-z]+', '_', dataset).strip('_')
  return f'{safe}_{shots}shot'


class FewshotEvaluator:
  """Few-shot linear probes of the pre-logits features on datasets.

  For each dataset, the frozen features of its 'train' split (the pool the
  k-shot sets are drawn from) and of its 'test' split (scored) are computed
  at the model's resolution with the evaluation preprocessing; the probe is
  fitted for every k of `shots` and its test accuracy averaged over
  `seeds`. Metrics are '<dataset>_<k>shot'.

  Config keys: `datasets` (names), `shots`, `seeds`, `l2_reg`, `every`
  (steps, 0: not during training), `final` (default False).
  """

  TRAIN_SPLIT = 'train'  # The pool of few-shot examples.
  TEST_SPLIT = 'test'  # What the probe is scored on.

  def __init__(
    self,
    context,
    *,
    name: str,
    datasets: Sequence[str],
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: int = DEFAULT_SEEDS,
    l2_reg: float = DEFAULT_L2_REG,
    every: int = 0,
    final: bool = False,
  ):
    if not datasets:
      raise ValueError(
        f'Evaluator {name!r} has no few-shot datasets: set its datasets (e.g. '
        '--config.fewshot.datasets=digits,cifar10).'
      )
    self.name, self.every, self.final = name, every, final
    self.shots, self.seeds, self.l2_reg = tuple(shots), seeds, l2_reg
    self._context = context
    self._datasets = {name: context.dataset(name) for name in datasets}
    # The model without its head: its output is what the head would see
    # (for a self-supervised model, the encoder's pre-logits).
    headless = context.task.description.replace(num_classes=None).build()
    self._features = jax.jit(
      lambda variables, images: headless.apply(variables, images, train=False)
    )

  def run(self, variables) -> dict[str, float]:
    results = {}
    with self._context.activation_sharding():
      for name, ds in self._datasets.items():
        train = extract_features(
          self._features, variables, ds.eval_iter(self.TRAIN_SPLIT)
        )
        test = extract_features(
          self._features, variables, ds.eval_iter(self.TEST_SPLIT)
        )
        accuracies = fewshot_evaluate(
          *train,
          *test,
          shots=self.shots,
          seeds=self.seeds,
          l2_reg=self.l2_reg,
          num_classes=ds.num_classes,
        )
        for shots, accuracy in accuracies.items():
          results[metric_name(name, shots)] = accuracy
    return results

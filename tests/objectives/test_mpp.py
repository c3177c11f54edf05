"""Masked patch prediction: corruption, targets, loss, a run, the checkpoint."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, digits_mpp, vit_b16_mpp
from helpers import TINY_VIT, abstract_params, init_params, random_images
from vit_jax import checkpoints, data, sharding
from vit_jax.jobs import finetune, pretrain
from vit_jax.models import get_model, vit
from vit_jax.models import mpp as mpp_model
from vit_jax.objectives import mpp

# Tolerances are this many binomial standard deviations.
SIGMAS = 5


def binomial_tolerance(p, n):
  return SIGMAS * math.sqrt(p * (1 - p) / n)


def tiny_mpp(target='mean_color', patch_size=4):
  return mpp_model.from_vit(
    get_model('ViT-B_16', None, patch_size=patch_size, **TINY_VIT),
    target=target,
  )


@functools.cache
def forward(model):
  """Jitted (params, images, seed) -> (outputs, what the model computed):
  the patch embeddings and the encoder's input and output (with the class
  token)."""

  @jax.jit
  def run(params, images, seed):
    seen = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.module.name == 'embedding':
        seen['tokens'] = out.reshape(out.shape[0], -1, out.shape[-1])
      if isinstance(context.module, vit.Encoder):
        seen['encoder_in'], seen['encoder_out'] = args[0], out
      return out

    with nn.intercept_methods(record):
      outputs = model.apply(
        {'params': params},
        images,
        rngs={mpp_model.CORRUPTION_RNG: jax.random.key(seed)},
      )
    return outputs, seen

  return run


def apply(model, params, images, seed=0):
  return jax.tree.map(np.asarray, forward(model)(params, images, seed))


# ----------------------------------------------------------------------------
# Corruption, observed at the encoder's input.


def encoder_inputs(model, params, images, seed):
  """The patch embeddings before and after corruption, and the flags."""
  outputs, seen = apply(model, params, images, seed)
  after = seen['encoder_in'][:, 1:]  # Drops the class token.
  return seen['tokens'], after, np.asarray(outputs['corrupted'])


def test_corruption_statistics():
  model = tiny_mpp()
  images = random_images((1024, 16, 16, 3))
  params = init_params(model, images[:1])
  mask_token = np.asarray(params['mask_token'][0, 0])
  counts = {'mask': 0, 'random': 0, 'unchanged': 0}
  per_position = np.zeros(16)
  offsets = np.zeros(16, int)
  draws = 4
  flags = []
  for seed in range(draws):
    before, after, corrupted = encoder_inputs(model, params, images, seed)
    flags.append(corrupted)
    # Exactly half of every image's 16 patches, uniform over positions.
    np.testing.assert_array_equal(corrupted.sum(axis=1), 8)
    per_position += corrupted.sum(axis=0)
    # same[b, i, j]: position i now holds patch j's embedding.
    same = (after[:, :, None] == before[:, None, :]).all(axis=-1)
    masked = (after == mask_token).all(axis=-1)
    itself = np.diagonal(same, axis1=1, axis2=2)
    assert not (masked & same.any(axis=-1)).any()
    np.testing.assert_array_equal(itself[~corrupted], True)
    counts['mask'] += masked[corrupted].sum()
    counts['unchanged'] += itself[corrupted].sum()
    # The rest holds another patch of the same image, not a new vector.
    moved = corrupted & ~masked & ~itself
    np.testing.assert_array_equal(same[moved].sum(axis=-1), 1)
    counts['random'] += moved.sum()
    _, i = np.nonzero(moved)
    j = same[moved].argmax(axis=-1)
    offsets += np.bincount((j - i) % 16, minlength=16)
  num_images = draws * len(images)
  np.testing.assert_allclose(
    per_position / num_images, 0.5, atol=binomial_tolerance(0.5, num_images)
  )
  total = sum(counts.values())
  assert total == num_images * 8
  for kind, p in (('mask', 0.8), ('random', 0.1), ('unchanged', 0.1)):
    assert abs(counts[kind] / total - p) < binomial_tolerance(p, total), kind
  # The other patch is uniform over the 15 others.
  assert offsets[0] == 0
  np.testing.assert_allclose(
    offsets[1:] / counts['random'],
    1 / 15,
    atol=binomial_tolerance(1 / 15, counts['random']),
  )
  # The draw is a function of the RNG: new for every key, repeated for one.
  assert not any(np.array_equal(flags[0], f) for f in flags[1:])
  np.testing.assert_array_equal(
    encoder_inputs(model, params, images, 0)[2], flags[0]
  )


# ----------------------------------------------------------------------------
# Targets against hand-computed patches.

# The 3-bit level of a value in [-1, 1]: 8 equal bins.
EDGES = np.linspace(-1, 1, 9)[1:-1]


def to_unit(uint8_image):
  return np.asarray(uint8_image, np.float32) / 127.5 - 1


def color_class(rgb):
  r, g, b = np.digitize(rgb, EDGES)
  return r * 64 + g * 8 + b


def test_mean_color_target_of_a_hand_made_patch():
  image = np.zeros((1, 8, 8, 3), np.uint8)
  # Top-left patch: red half 0 and half 255 (mean 127.5 -> 0.0, level 4),
  # green 31 (-0.757, level 0), blue 200 (0.569, level 6).
  image[0, :4, :2, 0] = 0
  image[0, :4, 2:4, 0] = 255
  image[0, :4, :4, 1] = 31
  image[0, :4, :4, 2] = 200
  # Top-right patch: white, the last class.
  image[0, :4, 4:] = 255
  classes = mpp.targets(jnp.asarray(to_unit(image)), 'mean_color', 4)
  assert classes.shape == (1, 4)
  assert classes[0, 0] == 4 * 64 + 0 * 8 + 6
  assert classes[0, 1] == 511
  assert classes[0, 2] == classes[0, 3] == 0


def test_colour_targets_match_numpy():
  rng = np.random.default_rng(0)
  images = to_unit(rng.integers(0, 256, (3, 16, 16, 3)))
  mean = np.asarray(mpp.targets(jnp.asarray(images), 'mean_color', 4))
  cells = np.asarray(mpp.targets(jnp.asarray(images), 'downsized_color', 4))
  assert mean.shape == (3, 4) and cells.shape == (3, 4, 16)
  for b in range(3):
    for n in range(4):
      row, col = divmod(n, 2)
      patch = images[b, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8]
      assert mean[b, n] == color_class(patch.mean(axis=(0, 1)))
      for k in range(16):
        y, x = divmod(k, 4)
        cell = patch[2 * y : 2 * y + 2, 2 * x : 2 * x + 2]
        assert cells[b, n, k] == color_class(cell.mean(axis=(0, 1)))


def test_pixel_targets_are_the_patches_in_token_order():
  images = random_images((2, 12, 8, 3))
  pixels = np.asarray(mpp.targets(images, 'pixels', 6))
  assert pixels.shape == (2, 6, 4 * 4 * 3)
  for n in range(6):
    row, col = divmod(n, 2)
    patch = images[:, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
    np.testing.assert_array_equal(pixels[:, n], patch.reshape(2, -1))
  # The encoder sees the patches in the same order: with an all-ones
  # kernel each uncorrupted token is the sum of its patch.
  model = tiny_mpp()
  params = init_params(model, images[:1])
  params['embedding'] = {
    'kernel': np.ones((4, 4, 3, 32), np.float32),
    'bias': np.zeros(32, np.float32),
  }
  outputs, seen = apply(model, params, images)
  kept = ~np.asarray(outputs['corrupted'])
  np.testing.assert_allclose(
    seen['encoder_in'][:, 1:, 0][kept], pixels.sum(-1)[kept], rtol=1e-5
  )


def test_unknown_target():
  with pytest.raises(ValueError, match='mean_color'):
    mpp.targets(random_images((1, 8, 8, 3)), 'mean_colour', 4)


# ----------------------------------------------------------------------------
# The loss: over corrupted patches only.


def log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize(
  'target,patch_size',
  [('mean_color', 4), ('downsized_color', 8), ('pixels', 4)],
)
def test_loss_averages_the_corrupted_patches(target, patch_size):
  model = tiny_mpp(target, patch_size)
  images = jnp.asarray(
    to_unit(np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3)))
  )
  params = init_params(model, images[:1])
  kernel_shape = params['mpp_head']['kernel'].shape
  params['mpp_head']['kernel'] = (
    np.random.default_rng(2).normal(size=kernel_shape).astype(np.float32)
  )
  outputs, _ = apply(model, params, images)
  predictions = np.asarray(outputs['predictions'], np.float64)
  corrupted = np.asarray(outputs['corrupted'])
  grid = 16 // patch_size
  assert corrupted.shape == (4, grid * grid)
  expected = []
  for b in range(4):
    losses = []
    for n in np.nonzero(corrupted[b])[0]:
      row, col = divmod(n, grid)
      patch = np.asarray(images[b])[
        patch_size * row : patch_size * (row + 1),
        patch_size * col : patch_size * (col + 1),
      ]
      if target == 'pixels':
        losses.append(np.mean((predictions[b, n] - patch.ravel()) ** 2))
      elif target == 'mean_color':
        label = color_class(patch.mean(axis=(0, 1)))
        losses.append(-log_softmax(predictions[b, n])[label])
      else:
        block = patch_size // 4
        cells = patch.reshape(4, block, 4, block, 3).mean(axis=(1, 3))
        labels = [color_class(c) for c in cells.reshape(16, 3)]
        losses.append(
          -np.mean(log_softmax(predictions[b, n])[np.arange(16), labels])
        )
    expected.append(np.mean(losses))
  loss = mpp.make_loss_fn(target)(outputs, images)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)


# ----------------------------------------------------------------------------
# Pretraining on the digits, and the checkpoint.

TINY_DIGITS = {
  'model.hidden_size': 32,
  'model.mlp_dim': 64,
  'model.num_heads': 2,
  'model.num_layers': 2,
  'batch_size': 32,
  'eval_batch_size': 128,
  # Long enough for the representation to help fine-tuning (below).
  'total_steps': 1500,
  'lr.base': 3e-3,
  'lr.warmup_steps': 30,
  'log_every': 50,
  'checkpoint_every': 500,
  'eval_every': 0,
  'export_npz': False,
}


def tiny_digits_config():
  config = digits_mpp.get_config()
  config.update_from_flattened_dict(TINY_DIGITS)
  return config


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('digits_mpp')
  config = tiny_digits_config()
  return config, workdir, pretrain.run(config, str(workdir))


def majority_colour_frequency(config, split):
  """The most frequent mean colour among all patches of a split, by numpy."""
  ds = data.get_dataset(config, sharding.create_mesh(-1, 1))
  counts = np.zeros(512)
  for batch in ds.local_eval_iter(split):
    images = batch['images'][batch['mask'] > 0]
    grid = images.reshape(len(images), 4, 4, 4, 4, 3).mean(axis=(2, 4))
    levels = np.digitize(grid, EDGES)
    classes = levels[..., 0] * 64 + levels[..., 1] * 8 + levels[..., 2]
    counts += np.bincount(classes.ravel(), minlength=512)
  return counts.max() / counts.sum(), counts.sum()


def test_pretraining_beats_the_majority_colour(digits_run):
  config, _, results = digits_run
  assert set(results) == {
    'eval_accuracy', 'eval_majority_accuracy', 'eval_loss',
    'test_accuracy', 'test_majority_accuracy', 'test_loss',
  }  # fmt: skip
  # The reported baseline counts the corrupted half of the patches; over all
  # patches it is the same up to sampling noise.
  baseline, patches = majority_colour_frequency(config, 'test')
  tolerance = binomial_tolerance(baseline, patches / 2)
  assert abs(results['test_majority_accuracy'] - baseline) < tolerance
  # 8 points are over 8 standard deviations of the accuracy's sampling noise
  # on the test split's 2,880 corrupted patches.
  assert results['test_accuracy'] > baseline + 0.08, (results, baseline)


def test_the_checkpoint_loads_as_a_plain_vit(digits_run):
  config, workdir, _ = digits_run
  variables, description = checkpoints.training.load_variables(workdir)
  assert description.objective == 'masked_patch_prediction'
  assert description.num_classes is None
  plain = description.build()
  target = abstract_params(plain, 16)
  params = variables['params']
  assert set(params) - set(target) == set(mpp_model.MPP_ONLY_PARAMS)
  loaded = checkpoints.fit_to_model(mpp_model.vit_params(params), target)
  # The plain ViT's features are the MPP encoder's class-token output on
  # uncorrupted patches.
  images = random_images((2, 16, 16, 3))
  features = plain.apply({'params': loaded}, images)
  uncorrupted = mpp.make_task(config, None).model.clone(corrupt_rate=0.0)
  _, seen = apply(uncorrupted, params, images)
  np.testing.assert_allclose(
    features, seen['encoder_out'][:, 0], rtol=1e-5, atol=1e-6
  )


def finetune_digits(init, architecture, workdir):
  config = common.finetune('ViT-Ti_16', 'digits')
  config.init = init
  for key, value in architecture.items():
    config.model[key] = value
  config.image_size = 16
  config.batch_size = 32
  config.eval_batch_size = 128
  config.total_steps = 150
  config.lr.warmup_steps = 15
  config.lr.base = 0.03
  config.log_every = 50
  config.checkpoint_every = 1000
  config.export_npz = False
  return finetune.run(config, str(workdir))


def test_mpp_pretraining_helps_fine_tuning(digits_run, tmp_path):
  """The same fine-tuning from the MPP checkpoint beats a random start."""
  _, workdir, _ = digits_run
  _, description = checkpoints.training.load_variables(workdir)
  architecture = description.architecture()
  pretrained = finetune_digits(str(workdir), {}, tmp_path / 'pretrained')
  scratch = finetune_digits(
    finetune.RANDOM_INIT, architecture, tmp_path / 'scratch'
  )
  # 360 test digits: 5 points are over 3 standard deviations of the
  # difference's sampling noise.
  assert pretrained['test_accuracy'] > scratch['test_accuracy'] + 0.05, (
    pretrained,
    scratch,
  )


# ----------------------------------------------------------------------------
# Configs and errors.


def test_vit_b16_mpp_carries_the_paper_schedule():
  config = vit_b16_mpp.get_config()
  assert config.objective == 'masked_patch_prediction'
  assert config.model_name == 'ViT-B_16' and config.dataset == 'jft300m'
  assert (config.batch_size, config.total_steps) == (4096, 1_000_000)
  assert config.optimizer.name == 'adam'
  assert (config.lr.base, config.lr.warmup_steps) == (2e-4, 10_000)
  assert config.lr.decay == 'cosine'
  assert dict(config.mpp) == {
    'target': 'mean_color',
    'corrupt_rate': 0.5,
    'mask_rate': 0.8,
    'random_rate': 0.1,
  }


def test_mpp_needs_a_vit_and_valid_rates():
  with pytest.raises(ValueError, match='needs a ViT'):
    mpp_model.from_vit(get_model('BiT-R50x1', None))
  config = tiny_digits_config()
  config.mpp.mask_rate = 0.95
  with pytest.raises(ValueError, match='sum to at most 1'):
    mpp.make_task(config, None)


def test_unknown_objective(tmp_path):
  config = tiny_digits_config()
  config.objective = 'contrastive'
  with pytest.raises(ValueError, match='masked_patch_prediction'):
    pretrain.run(config, str(tmp_path))

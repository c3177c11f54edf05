"""The train step under every mesh and strategy equals the one-device step."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from helpers import TINY_VIT, needs_custom_calls, randomize
from vit_jax import checkpoints, models, optim, sharding, steps, train_state

NUM_CLASSES = 10


def optimizer_config(name):
  config = common.base()
  config.optimizer.name = name
  config.optimizer.weight_decay = 0.1 if name == 'adam' else 0.0
  config.lr.base = 0.1 if name == 'sgd' else 1e-3
  config.lr.warmup_steps = 0
  config.lr.decay = 'constant'
  return config


def fixed_batch(batch_size=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch_size, 16, 16, 3)).astype(np.float32)
  labels = np.eye(NUM_CLASSES, dtype=np.float32)[
    rng.integers(0, NUM_CLASSES, batch_size)
  ]
  return {'images': images, 'labels': labels}


def initial_variables(model):
  """Random weights, including the head (a zero head has zero gradients)."""
  variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 16, 16, 3)))
  return {
    'params': randomize(sharding.strip_boxes(variables)['params'], scale=0.05)
  }


def one_step(
  mesh_shape, strategy='dp', kind='jit', accum_steps=1, optimizer='sgd',
  dropout=0.0, ema_decay=0.0, num_steps=1, matmul='auto', attention='auto',
):  # fmt: skip
  devices = jax.devices()[: math.prod(mesh_shape)]
  mesh = sharding.create_mesh(*mesh_shape, devices=devices)
  model = models.get_model(
    'ViT-B_16', NUM_CLASSES, patch_size=4, dropout_rate=dropout,
    matmul=matmul, attention=attention, **TINY_VIT,
  )  # fmt: skip
  config = optimizer_config(optimizer)
  schedule = optim.learning_rate_schedule(config.lr, 100)
  tx = optim.make_optimizer(config.optimizer, schedule)

  def init(rng):
    return model.init(rng, jnp.zeros((1, 16, 16, 3)))

  with sharding.activation_sharding(mesh, strategy):
    layout = train_state.state_layout(init, tx, ema_decay > 0, mesh, strategy)
    state = train_state.state_from_variables(
      initial_variables(model), tx, ema_decay > 0, layout
    )
    step = steps.make_train_step(
      model, tx, steps.get_loss('softmax_xent'), schedule, seed=0, mesh=mesh,
      layout=layout, kind=kind, accum_steps=accum_steps, ema_decay=ema_decay,
    )  # fmt: skip
    losses = []
    for i in range(num_steps):
      batch = jax.device_put(fixed_batch(seed=i), sharding.batch_sharding(mesh))
      state, metrics = step(state, batch)
      losses.append(float(metrics['train_loss']))
  return jax.device_get(state), losses, layout


@pytest.fixture(scope='module')
def reference():
  return one_step((1, 1))


def assert_same_update(state, reference_state, rtol=1e-5):
  before = initial_variables(
    models.get_model('ViT-B_16', NUM_CLASSES, patch_size=4, **TINY_VIT)
  )['params']
  for new, ref, old in zip(
    jax.tree.leaves(state.params),
    jax.tree.leaves(reference_state.params),
    jax.tree.leaves(before),
    strict=True,
  ):
    np.testing.assert_allclose(new, ref, rtol=rtol, atol=1e-7)
    # The update itself (not just the parameters) agrees.
    delta, ref_delta = new - old, ref - old
    scale = max(np.linalg.norm(ref_delta), 1e-12)
    assert np.linalg.norm(delta - ref_delta) / scale < 1e-4


@pytest.mark.parametrize('mesh_shape', [(8, 1), (4, 2), (2, 4)])
@pytest.mark.parametrize('strategy', ['dp', 'fsdp', 'tp'])
def test_sharded_step_equals_single_device(reference, mesh_shape, strategy):
  ref_state, ref_losses, _ = reference
  state, losses, layout = one_step(mesh_shape, strategy)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_same_update(state, ref_state)
  kernel = layout.shardings.params['Transformer']['encoderblock_0'][
    'MlpBlock_3']['Dense_0']['kernel']  # fmt: skip
  expected = {
    'dp': (None, None),
    'fsdp': ('data', None),
    'tp': (None, 'model'),  # a size-1 'model' axis replicates
  }[strategy]
  assert tuple(kernel.spec) == expected


def test_shard_map_step_equals_single_device(reference):
  ref_state, ref_losses, _ = reference
  state, losses, _ = one_step((8, 1), kind='shard_map')
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_same_update(state, ref_state)


@needs_custom_calls('onednn')
@pytest.mark.parametrize(
  'mesh_shape, kind', [((1, 1), 'jit'), ((8, 1), 'jit'), ((8, 1), 'shard_map')]
)
@pytest.mark.parametrize(
  'options', [dict(matmul='onednn'), dict(attention='onednn')], ids=str
)
def test_onednn_step_equals_xla_step(reference, mesh_shape, kind, options):
  ref_state, ref_losses, _ = reference
  state, losses, _ = one_step(mesh_shape, kind=kind, **options)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_same_update(state, ref_state)


def test_shard_map_needs_a_data_parallel_mesh():
  with pytest.raises(ValueError, match=r'mesh\.model=1'):
    one_step((4, 2), kind='shard_map')


def test_gradient_accumulation_equals_the_full_batch(reference):
  ref_state, ref_losses, _ = reference
  state, losses, _ = one_step((4, 2), 'fsdp', accum_steps=4)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_same_update(state, ref_state)


def test_adam_steps_agree_across_strategies():
  ref_state, ref_losses, _ = one_step((1, 1), optimizer='adam', num_steps=3)
  state, losses, _ = one_step((2, 4), 'tp', optimizer='adam', num_steps=3)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  flat = checkpoints.flatten(state.params)
  ref_flat = checkpoints.flatten(ref_state.params)
  for key, value in flat.items():
    # The key bias adds the same q.b to every logit of a query: softmax
    # ignores it, so its true gradient is 0 and Adam's normalised update of
    # the rounding noise is arbitrary.
    if key.endswith('key/bias'):
      continue
    np.testing.assert_allclose(value, ref_flat[key], rtol=1e-4, atol=1e-6)


def test_dropout_is_the_same_under_every_sharding():
  ref_state, ref_losses, _ = one_step((1, 1), dropout=0.2)
  state, losses, _ = one_step((4, 2), 'fsdp', dropout=0.2)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  without, _, _ = one_step((1, 1))
  # Dropout changed the update, identically on both meshes.
  assert not np.allclose(
    jax.tree.leaves(without.params)[0], jax.tree.leaves(ref_state.params)[0]
  )
  assert_same_update(state, ref_state)


def test_ema_tracks_the_parameters():
  state, _, _ = one_step((8, 1), ema_decay=0.5, num_steps=2)
  # After two steps ema = 0.25 * p0 + 0.25 * p1 + 0.5 * p2.
  p0 = initial_variables(
    models.get_model('ViT-B_16', NUM_CLASSES, patch_size=4, **TINY_VIT)
  )['params']
  p1_state, _, _ = one_step((8, 1), num_steps=1)
  p2 = state.params
  expected = jax.tree.map(
    lambda a, b, c: 0.25 * a + 0.25 * b + 0.5 * c, p0, p1_state.params, p2
  )
  for a, b in zip(
    jax.tree.leaves(state.ema_params), jax.tree.leaves(expected), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# Losses, schedules and optimizers against formulas written here.


def test_losses():
  logits = np.array([[2.0, -1.0, 0.5]])
  labels = np.array([[0.0, 1.0, 0.0]])
  log_p = logits - np.log(np.exp(logits).sum())
  np.testing.assert_allclose(
    steps.softmax_xent(logits, labels), [-log_p[0, 1]], rtol=1e-6
  )
  smoothed = labels * 0.9 + 0.1 / 3
  np.testing.assert_allclose(
    steps.softmax_xent(logits, labels, 0.1),
    [-(smoothed * log_p).sum()],
    rtol=1e-6,
  )
  sigmoid = 1 / (1 + np.exp(-logits))
  expected = -(labels * np.log(sigmoid) + (1 - labels) * np.log(1 - sigmoid))
  np.testing.assert_allclose(
    steps.sigmoid_xent(logits, labels), [expected.sum()], rtol=1e-6
  )
  with pytest.raises(ValueError, match='softmax_xent'):
    steps.get_loss('hinge')


def lr_config(**kwargs):
  return ml_collections.ConfigDict(
    dict(base=1.0, warmup_steps=10, warmup_epochs=None, warmup_init=0.0,
         decay='linear', end=0.0) | kwargs
  )  # fmt: skip


def test_schedules():
  linear = optim.learning_rate_schedule(lr_config(end=0.1), 110)
  np.testing.assert_allclose(
    [linear(s) for s in (0, 5, 10, 60, 110)], [0.0, 0.5, 1.0, 0.55, 0.1],
    rtol=1e-6, atol=1e-7,
  )  # fmt: skip
  cosine = optim.learning_rate_schedule(lr_config(decay='cosine'), 110)
  for s in (10, 35, 60, 110):
    expected = 0.5 * (1 + math.cos(math.pi * (s - 10) / 100))
    np.testing.assert_allclose(cosine(s), expected, rtol=1e-5, atol=1e-7)
  epochs = optim.learning_rate_schedule(
    lr_config(warmup_epochs=2.0, warmup_init=0.1), 100, steps_per_epoch=5
  )
  np.testing.assert_allclose(epochs(0), 0.1, rtol=1e-6)
  np.testing.assert_allclose(epochs(10), 1.0, rtol=1e-6)


def test_adamw_follows_the_papers_weight_decay():
  """p <- p - lr * (adam_step + wd * p)."""
  config = optimizer_config('adam')
  config.optimizer.grad_clip_norm = 0.0
  tx = optim.make_optimizer(config.optimizer, optax.constant_schedule(0.01))
  params = {'w': jnp.array([1.0, -2.0]), 'b': jnp.array([0.5])}
  grads = {'w': jnp.array([0.3, 0.1]), 'b': jnp.array([-0.2])}
  updates, _ = tx.update(grads, tx.init(params), params)
  # First Adam step: m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps).
  for k in params:
    g, p = np.asarray(grads[k]), np.asarray(params[k])
    expected = -0.01 * (g / (np.abs(g) + 1e-8) + 0.1 * p)
    np.testing.assert_allclose(updates[k], expected, rtol=1e-5)
  # decay_1d_params=False exempts biases.
  config.optimizer.decay_1d_params = False
  tx = optim.make_optimizer(config.optimizer, optax.constant_schedule(0.01))
  params = {'w': jnp.ones((2, 2)), 'b': jnp.array([0.5])}
  grads = {'w': jnp.ones((2, 2)), 'b': jnp.array([1.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['b'], [-0.01], rtol=1e-5)
  np.testing.assert_allclose(updates['w'], -0.01 * (1 + 0.1), rtol=1e-5)


def test_vit_h14_state_is_sharded_under_fsdp():
  """Sharded initialisation: no device holds more than its share of ViT-H."""
  model = models.get_model('ViT-H_14', 1000, scan=True)
  config = optimizer_config('adam')
  tx = optim.make_optimizer(
    config.optimizer, optim.learning_rate_schedule(config.lr, 10)
  )
  mesh = sharding.create_mesh(8, 1)
  layout = train_state.state_layout(
    lambda rng: model.init(rng, jnp.zeros((1, 224, 224, 3))),
    tx, False, mesh, 'fsdp',
  )  # fmt: skip
  total = per_device = 0
  for x in jax.tree.leaves(layout.abstract):
    size = math.prod(x.shape) * x.dtype.itemsize
    shard = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    total += size
    per_device += shard
    if math.prod(x.shape) >= 1_000_000:  # Every large array is split 8 ways.
      assert shard * 8 == size, x
  # 632M parameters plus two Adam moments, in float32.
  assert total > 3 * 632_000_000 * 4
  assert per_device < total / 8 * 1.01

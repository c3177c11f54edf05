"""Losses, the sharded train step, and the evaluation step.

Two train steps compute the same update:
- `jit`: one program over the global batch; GSPMD partitions it following
  the state's and batch's shardings (dp, fsdp or tp).
- `shard_map`: explicit data parallelism; each device runs the step on its
  slice of the batch and the loss is averaged over the 'data' axis (the
  gradient of that mean is the mean gradient).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax import sharding
from vit_jax.train_state import StateLayout, TrainState

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
STEPS = ('jit', 'shard_map')


def softmax_xent(logits, labels, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy with (soft) label distributions."""
  if label_smoothing:
    labels = labels * (1 - label_smoothing) + label_smoothing / labels.shape[-1]
  return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)


def sigmoid_xent(logits, labels):
  """Per-example sigmoid cross-entropy, summed over classes (multi-label)."""
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


def get_loss(name: str, label_smoothing: float = 0.0) -> LossFn:
  if name == 'softmax_xent':
    return lambda logits, labels: softmax_xent(logits, labels, label_smoothing)
  if name == 'sigmoid_xent':
    return sigmoid_xent
  raise ValueError(
    f"config.loss={name!r}; use 'softmax_xent' or 'sigmoid_xent'."
  )


def _apply(model, variables, images, train, rng):
  """Runs the model; returns logits and the updated batch statistics."""
  if 'batch_stats' not in variables:
    logits = model.apply(variables, images, train=train, rngs={'dropout': rng})
    return logits, {}
  logits, updates = model.apply(
    variables,
    images,
    train=train,
    rngs={'dropout': rng},
    mutable=['batch_stats'],
  )
  return logits, updates['batch_stats']


def _microbatches(x: jax.Array, num: int, mesh: Mesh | None) -> jax.Array:
  """(B, ...) -> (num, B / num, ...), micro-batch i holding rows i::num.

  Interleaving keeps every micro-batch spread over all devices of a sharded
  batch instead of living on 1/num of them.
  """
  x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
  if mesh is not None:
    x = jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, P(None, sharding.DATA))
    )
  return x


def _gradients(
  loss_of_params: Callable,
  params,
  batch_stats,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  accum_steps: int,
  mesh: Mesh | None,
):
  """Loss, gradient and new batch statistics, over `accum_steps` micro-batches.

  Args:
    loss_of_params: (params, batch_stats, images, labels, rng) -> (loss, new
      batch_stats); the mean loss of a (micro-)batch.
  """
  grad_fn = jax.value_and_grad(loss_of_params, has_aux=True)
  if accum_steps == 1:
    (loss, batch_stats), grads = grad_fn(
      params, batch_stats, batch['images'], batch['labels'], rng
    )
    return loss, grads, batch_stats

  images = _microbatches(batch['images'], accum_steps, mesh)
  labels = _microbatches(batch['labels'], accum_steps, mesh)

  def accumulate(carry, inputs):
    loss_sum, grad_sum, stats = carry
    index, micro_images, micro_labels = inputs
    (loss, stats), grads = grad_fn(
      params, stats, micro_images, micro_labels, jax.random.fold_in(rng, index)
    )
    grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
    return (loss_sum + loss, grad_sum, stats), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss_sum, grad_sum, batch_stats), _ = jax.lax.scan(
    accumulate,
    (jnp.zeros(()), zeros, batch_stats),
    (jnp.arange(accum_steps), images, labels),
  )
  grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
  return loss_sum / accum_steps, grads, batch_stats


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  loss_fn: LossFn,
  schedule: optax.Schedule,
  *,
  seed: int,
  mesh: Mesh,
  layout: StateLayout,
  kind: str = 'jit',
  accum_steps: int = 1,
  ema_decay: float = 0.0,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]:
  """Builds the compiled `(state, batch) -> (state, metrics)` step.

  The state is donated: its buffers are reused for the new state.

  Args:
    model: the Flax module.
    tx: the optimizer.
    loss_fn: per-example loss of (logits, labels).
    schedule: the learning-rate schedule (only reported in the metrics).
    seed: dropout randomness is derived from (seed, step).
    mesh: the device mesh.
    layout: the state's shapes and shardings.
    kind: 'jit' or 'shard_map' (data parallel only).
    accum_steps: micro-batches per step (gradient accumulation).
    ema_decay: Polyak averaging of the parameters; 0 disables it.
  """
  if kind not in STEPS:
    raise ValueError(f'config.step={kind!r}; use one of {STEPS}.')

  def update(state: TrainState, loss, grads, batch_stats):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
    metrics = {
      'train_loss': loss,
      'grad_norm': optax.global_norm(grads),
      'learning_rate': schedule(state.step),
    }
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      batch_stats=batch_stats,
      ema_params=ema,
    )
    return new_state, metrics

  def step_rng(step):
    return jax.random.fold_in(jax.random.key(seed), step)

  if kind == 'jit':

    def mean_loss(params, batch_stats, images, labels, rng):
      variables = {'params': params}
      if batch_stats:
        variables['batch_stats'] = batch_stats
      logits, new_stats = _apply(model, variables, images, True, rng)
      return jnp.mean(loss_fn(logits, labels)), new_stats

    def train_step(state, batch):
      loss, grads, batch_stats = _gradients(
        mean_loss,
        state.params,
        state.batch_stats,
        batch,
        step_rng(state.step),
        accum_steps,
        mesh,
      )
      return update(state, loss, grads, batch_stats)

  else:
    if mesh.shape[sharding.MODEL] != 1:
      raise ValueError(
        "config.step='shard_map' is data parallel: set --config.mesh.model=1 "
        "(or use config.step='jit' for tensor parallelism)."
      )
    # Inside shard_map BatchNorm sees one device's slice: average its
    # statistics over the data axis.
    local_model = (
      model.clone(bn_axis_name=sharding.DATA)
      if hasattr(model, 'bn_axis_name')
      else model
    )

    def mean_loss(params, batch_stats, images, labels, rng):
      variables = {'params': params}
      if batch_stats:
        variables['batch_stats'] = batch_stats
      logits, new_stats = _apply(local_model, variables, images, True, rng)
      loss = jnp.mean(loss_fn(logits, labels))
      return jax.lax.pmean(loss, sharding.DATA), new_stats

    def local_step(state, batch):
      rng = jax.random.fold_in(
        step_rng(state.step), jax.lax.axis_index(sharding.DATA)
      )
      # Per-device code: no sharding constraints on the activations.
      with nn.logical_axis_rules(()):
        loss, grads, batch_stats = _gradients(
          mean_loss,
          state.params,
          state.batch_stats,
          batch,
          rng,
          accum_steps,
          None,
        )
      return update(state, loss, grads, batch_stats)

    def train_step(state, batch):
      return jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(P(), P(sharding.DATA)),
        out_specs=(P(), P()),
      )(state, batch)

  batch_sharding = sharding.batch_sharding(mesh)
  return jax.jit(
    train_step,
    in_shardings=(layout.shardings, batch_sharding),
    out_shardings=(layout.shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def make_eval_step(
  model: nn.Module, loss_fn: LossFn, mesh: Mesh
) -> Callable[[dict, dict[str, jax.Array]], dict[str, jax.Array]]:
  """Builds the compiled `(variables, batch) -> sums` evaluation step.

  A prediction is correct when its top-1 class has a positive label: plain
  top-1 accuracy for one-hot labels, and ReaL accuracy for multi-hot label
  sets, where examples with an empty set do not count (as in ImageNet ReaL).
  Padding examples (mask 0) never count.
  """

  def eval_step(variables, batch):
    logits = model.apply(variables, batch['images'], train=False)
    labels = batch['labels']
    valid = batch['mask'] * (jnp.max(labels, axis=-1) > 0)
    top1 = jnp.argmax(logits, axis=-1)
    correct = jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
    return {
      'correct': jnp.sum(correct * valid),
      'count': jnp.sum(valid),
      'loss_sum': jnp.sum(loss_fn(logits, labels) * valid),
    }

  return jax.jit(
    eval_step,
    in_shardings=(None, sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def evaluate(eval_step: Callable, variables: dict, batches) -> dict[str, float]:
  """Accuracy and mean loss over an iterable of padded, masked batches."""
  totals: dict[str, Any] = {}
  for batch in batches:
    sums = eval_step(variables, batch)
    totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
  if not totals:
    raise ValueError('The evaluation split is empty.')
  totals = jax.device_get(totals)
  count = max(float(totals['count']), 1.0)
  return {
    'accuracy': float(totals['correct']) / count,
    'loss': float(totals['loss_sum']) / count,
    'examples': int(totals['count']),
  }

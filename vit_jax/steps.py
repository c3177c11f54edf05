"""Losses and the sharded train step (the evaluation step: eval_step.py).

Two train steps compute the same update:
- `jit`: one program over the global batch; GSPMD partitions it following
  the state's and batch's shardings (dp, fsdp or tp).
- `shard_map`: explicit data parallelism; each device runs the step on its
  slice of the batch and the loss is averaged over the 'data' axis (the
  gradient of that mean is the mean gradient).

The loss compares the model's outputs with one entry of the batch, its
targets: the labels, or the images for a self-supervised objective.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax import sharding
from vit_jax.train_state import StateLayout, TrainState

# Per-example loss of (model outputs, targets).
LossFn = Callable[[Any, jax.Array], jax.Array]
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


def model_rngs(rng: jax.Array, streams: Sequence[str]) -> dict[str, jax.Array]:
  """The model's RNG keys: `rng` for dropout, a fold-in of it per stream."""
  keys = {'dropout': rng}
  for i, name in enumerate(streams, start=1):
    keys[name] = jax.random.fold_in(rng, i)
  return keys


def _apply(model, variables, images, train, rngs):
  """Runs the model; returns its outputs and the updated batch statistics."""
  if 'batch_stats' not in variables:
    outputs = model.apply(variables, images, train=train, rngs=rngs)
    return outputs, {}
  outputs, updates = model.apply(
    variables,
    images,
    train=train,
    rngs=rngs,
    mutable=['batch_stats'],
  )
  return outputs, updates['batch_stats']


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
  target: str,
  rng: jax.Array,
  accum_steps: int,
  mesh: Mesh | None,
):
  """Loss, gradient and new batch statistics, over `accum_steps` micro-batches.

  Args:
    loss_of_params: (params, batch_stats, images, targets, rng) -> (loss, new
      batch_stats); the mean loss of a (micro-)batch.
  """
  grad_fn = jax.value_and_grad(loss_of_params, has_aux=True)
  if accum_steps == 1:
    (loss, batch_stats), grads = grad_fn(
      params, batch_stats, batch['images'], batch[target], rng
    )
    return loss, grads, batch_stats

  images = _microbatches(batch['images'], accum_steps, mesh)
  labels = _microbatches(batch[target], accum_steps, mesh)

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


def _make_update(tx, schedule, ema_decay: float):
  """(state, loss, grads, batch_stats) -> (new state, metrics)."""

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

  return update


def _mean_loss_of(module, loss_fn, rng_streams, data_axis=None):
  """(params, batch_stats, images, targets, rng) -> (mean loss, new stats).

  With `data_axis` (inside shard_map) the mean is over every device's
  slice: `grad` of it is the global gradient.
  """

  def mean_loss(params, batch_stats, images, targets, rng):
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    outputs, new_stats = _apply(
      module, variables, images, True, model_rngs(rng, rng_streams)
    )
    loss = jnp.mean(loss_fn(outputs, targets))
    if data_axis is not None:
      loss = jax.lax.pmean(loss, data_axis)
    return loss, new_stats

  return mean_loss


def _step_rng(seed: int, step) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), step)


def _jit_step(model, loss_fn, update, mesh, *, seed, target, accum_steps,
              rng_streams):  # fmt: skip
  """One program over the global batch, partitioned by GSPMD."""
  mean_loss = _mean_loss_of(model, loss_fn, rng_streams)

  def train_step(state, batch):
    loss, grads, batch_stats = _gradients(
      mean_loss,
      state.params,
      state.batch_stats,
      batch,
      target,
      _step_rng(seed, state.step),
      accum_steps,
      mesh,
    )
    return update(state, loss, grads, batch_stats)

  return train_step


def _shard_map_step(model, loss_fn, update, mesh, *, seed, target,
                    accum_steps, rng_streams):  # fmt: skip
  """Explicit data parallelism: each device steps on its slice."""
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
  mean_loss = _mean_loss_of(local_model, loss_fn, rng_streams, sharding.DATA)

  def local_step(state, batch):
    rng = jax.random.fold_in(
      _step_rng(seed, state.step), jax.lax.axis_index(sharding.DATA)
    )
    # Per-device code: no sharding constraints on the activations.
    with nn.logical_axis_rules(()):
      loss, grads, batch_stats = _gradients(
        mean_loss,
        state.params,
        state.batch_stats,
        batch,
        target,
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

  return train_step


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
  target: str = 'labels',
  rng_streams: Sequence[str] = (),
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]:
  """Builds the compiled `(state, batch) -> (state, metrics)` step.

  The state is donated: its buffers are reused for the new state.

  Args:
    model: the Flax module.
    tx: the optimizer.
    loss_fn: per-example loss of (model outputs, targets).
    schedule: the learning-rate schedule (only reported in the metrics).
    seed: dropout randomness (and every RNG stream's) is derived from (seed,
      step).
    mesh: the device mesh.
    layout: the state's shapes and shardings.
    kind: 'jit' or 'shard_map' (data parallel only).
    accum_steps: micro-batches per step (gradient accumulation).
    ema_decay: Polyak averaging of the parameters; 0 disables it.
    target: the batch entry the loss compares the outputs with.
    rng_streams: RNG streams the model draws from besides 'dropout'.
  """
  if kind not in STEPS:
    raise ValueError(f'config.step={kind!r}; use one of {STEPS}.')
  update = _make_update(tx, schedule, ema_decay)
  options = dict(
    seed=seed, target=target, accum_steps=accum_steps, rng_streams=rng_streams
  )
  if kind == 'jit':
    train_step = _jit_step(model, loss_fn, update, mesh, **options)
  else:
    train_step = _shard_map_step(model, loss_fn, update, mesh, **options)
  batch_sharding = sharding.batch_sharding(mesh)
  return jax.jit(
    train_step,
    in_shardings=(layout.shardings, batch_sharding),
    out_shardings=(layout.shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def make_train_step_from_config(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tx: optax.GradientTransformation,
  loss_fn: LossFn,
  schedule: optax.Schedule,
  *,
  mesh: Mesh,
  layout: StateLayout,
  **task_options,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]:
  """`make_train_step` with the config's step settings.

  The one place where config keys (seed, step, grad_accum_steps, ema_decay)
  become step options, for the training loop and the benchmark alike;
  `task_options` are the rest of `make_train_step`'s keywords (target,
  rng_streams).
  """
  return make_train_step(
    model,
    tx,
    loss_fn,
    schedule,
    seed=config.seed,
    mesh=mesh,
    layout=layout,
    kind=config.step,
    accum_steps=config.grad_accum_steps,
    ema_decay=config.ema_decay,
    **task_options,
  )

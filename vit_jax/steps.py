"""Losses, the sharded train step, and the evaluation step.

Two train steps compute the same update:
- `jit`: one program over the global batch; GSPMD partitions it following
  the state's and batch's shardings (dp, fsdp or tp).
- `shard_map`: explicit data parallelism; each device runs the step on its
  slice of the batch and the loss is averaged over the 'data' axis (the
  gradient of that mean is the mean gradient).

The loss compares the model's outputs with one entry of the batch, its
targets: the labels, or the images for a self-supervised objective.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax import sharding
from vit_jax.train_state import StateLayout, TrainState

# Per-example loss of (model outputs, targets).
LossFn = Callable[[Any, jax.Array], jax.Array]
# An evaluation's totals over a split -> the metrics reported.
Summarize = Callable[[dict[str, np.ndarray]], dict[str, float]]
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


@dataclasses.dataclass(frozen=True)
class EvalMetrics:
  """What evaluation measures.

  Attributes:
    sums: (model outputs, targets, mask) -> a dict of sums over the batch,
      where mask is 1 for the examples of the split and 0 for padding; they
      are added up over the split.
    summarize: the split's totals (numpy) -> the metrics reported.
  """

  sums: Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]
  summarize: Summarize


def _classification_summary(totals: dict[str, np.ndarray]) -> dict[str, float]:
  count = max(float(totals['count']), 1.0)
  return {
    'accuracy': float(totals['correct']) / count,
    'loss': float(totals['loss_sum']) / count,
    'examples': int(totals['count']),
  }


def classification_metrics(loss_fn: LossFn) -> EvalMetrics:
  """Top-1 accuracy and mean loss of logits against (multi-hot) labels.

  A prediction is correct when its top-1 class has a positive label: plain
  top-1 accuracy for one-hot labels, and ReaL accuracy for multi-hot label
  sets, where examples with an empty set do not count (as in ImageNet ReaL).
  Padding examples (mask 0) never count.
  """

  def sums(logits, labels, mask):
    valid = mask * (jnp.max(labels, axis=-1) > 0)
    top1 = jnp.argmax(logits, axis=-1)
    correct = jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
    return {
      'correct': jnp.sum(correct * valid),
      'count': jnp.sum(valid),
      'loss_sum': jnp.sum(loss_fn(logits, labels) * valid),
    }

  return EvalMetrics(sums, _classification_summary)


def _rngs(rng: jax.Array, streams: Sequence[str]) -> dict[str, jax.Array]:
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

  def mean_loss_of(module, data_axis=None):
    """The batch's mean loss and new BatchNorm statistics.

    With `data_axis` (inside shard_map) the mean is over every device's
    slice: `grad` of it is the global gradient.
    """

    def mean_loss(params, batch_stats, images, targets, rng):
      variables = {'params': params}
      if batch_stats:
        variables['batch_stats'] = batch_stats
      outputs, new_stats = _apply(
        module, variables, images, True, _rngs(rng, rng_streams)
      )
      loss = jnp.mean(loss_fn(outputs, targets))
      if data_axis is not None:
        loss = jax.lax.pmean(loss, data_axis)
      return loss, new_stats

    return mean_loss

  if kind == 'jit':
    mean_loss = mean_loss_of(model)

    def train_step(state, batch):
      loss, grads, batch_stats = _gradients(
        mean_loss,
        state.params,
        state.batch_stats,
        batch,
        target,
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
    mean_loss = mean_loss_of(local_model, sharding.DATA)

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


def make_eval_step(
  model: nn.Module,
  loss_fn: LossFn,
  mesh: Mesh,
  *,
  metrics: EvalMetrics | None = None,
  target: str = 'labels',
  rng_streams: Sequence[str] = (),
  seed: int = 0,
) -> Callable[[dict, dict[str, jax.Array]], dict[str, jax.Array]]:
  """Builds the compiled `(variables, batch) -> sums` evaluation step.

  Args:
    model: the Flax module.
    loss_fn: per-example loss of (model outputs, targets).
    mesh: the device mesh.
    metrics: what to measure; `classification_metrics(loss_fn)` by default.
    target: the batch entry the outputs are compared with.
    rng_streams: RNG streams the model draws from (besides 'dropout').
    seed: their keys are derived from it, the same for every batch.
  """
  metrics = metrics or classification_metrics(loss_fn)

  def eval_step(variables, batch):
    outputs = model.apply(
      variables,
      batch['images'],
      train=False,
      rngs=_rngs(jax.random.key(seed), rng_streams),
    )
    return metrics.sums(outputs, batch[target], batch['mask'])

  return jax.jit(
    eval_step,
    in_shardings=(None, sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def evaluate(
  eval_step: Callable,
  variables: dict,
  batches,
  summarize: Summarize = _classification_summary,
) -> dict[str, float]:
  """The metrics of an iterable of padded, masked batches.

  `summarize` turns the eval step's totals into metrics (`EvalMetrics`); the
  default gives the accuracy, mean loss and examples of
  `classification_metrics`.
  """
  totals: dict[str, Any] = {}
  for batch in batches:
    sums = eval_step(variables, batch)
    totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
  if not totals:
    raise ValueError('The evaluation split is empty.')
  return summarize(jax.device_get(totals))

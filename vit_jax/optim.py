"""Learning-rate schedules and optimizers of the paper, with optax.

Pretraining (Table 3): Adam (0.9, 0.999), decoupled weight decay multiplied
by the learning rate (p <- p - lr * (adam_step + wd * p), flax.optim.Adam's
convention, which optax.adamw shares), global-norm clipping at 1, linear
warm-up then linear or cosine decay.
Fine-tuning (Table 4): SGD with momentum 0.9, no weight decay, clipping at 1,
cosine decay.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

DECAYS = ('linear', 'cosine', 'constant')
OPTIMIZERS = ('adam', 'sgd')


def warmup_steps(lr: ml_collections.ConfigDict, steps_per_epoch: float) -> int:
  """`lr.warmup_epochs` (if set) in steps, else `lr.warmup_steps`."""
  if lr.get('warmup_epochs') is not None:
    return round(lr.warmup_epochs * steps_per_epoch)
  return lr.warmup_steps


def learning_rate_schedule(
  lr: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: float = 1.0
) -> optax.Schedule:
  """Linear warm-up from `warmup_init * base` to `base`, then the decay.

  Args:
    lr: the config's `lr` section (base, warmup_steps or warmup_epochs,
      warmup_init, decay, end).
    total_steps: length of the run; the decay reaches `end` there.
    steps_per_epoch: converts `warmup_epochs` to steps.
  """
  if lr.decay not in DECAYS:
    raise ValueError(f'config.lr.decay={lr.decay!r}; use one of {DECAYS}.')
  warmup = min(warmup_steps(lr, steps_per_epoch), total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if lr.decay == 'linear':
    decay = optax.linear_schedule(lr.base, lr.end, decay_steps)
  elif lr.decay == 'cosine':
    decay = optax.cosine_decay_schedule(
      lr.base, decay_steps, alpha=lr.end / lr.base if lr.base else 0.0
    )
  else:
    decay = optax.constant_schedule(lr.base)
  if not warmup:
    return decay
  ramp = optax.linear_schedule(
    lr.get('warmup_init', 0.0) * lr.base, lr.base, warmup
  )
  return optax.join_schedules([ramp, decay], [warmup])


def _matrices_only(params):
  """Weight-decay mask exempting 1-D parameters (biases, norm scales)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(
  optimizer: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """The update rule of `config.optimizer` (see configs/common.py)."""
  if optimizer.name not in OPTIMIZERS:
    raise ValueError(
      f'config.optimizer.name={optimizer.name!r}; use one of {OPTIMIZERS}.'
    )
  mu_dtype = jnp.dtype(optimizer.mu_dtype)
  mask = None if optimizer.decay_1d_params else _matrices_only
  chain = []
  if optimizer.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(optimizer.grad_clip_norm))
  if optimizer.name == 'adam':
    chain.append(
      optax.adamw(
        schedule,
        b1=optimizer.b1,
        b2=optimizer.b2,
        eps=optimizer.eps,
        weight_decay=optimizer.weight_decay,
        mu_dtype=mu_dtype,
        mask=mask,
      )
    )
  else:
    if optimizer.weight_decay:
      chain.append(optax.add_decayed_weights(optimizer.weight_decay, mask))
    chain.append(
      optax.sgd(
        schedule, momentum=optimizer.momentum, accumulator_dtype=mu_dtype
      )
    )
  return optax.chain(*chain)

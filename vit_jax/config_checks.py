"""Checks of a job config's numbers, before any work is done.

A zero batch size or logging interval would otherwise surface as a
ZeroDivisionError after compiling, and a negative step count as results of
an untrained model. Every rule names its key; keys a config does not have
(each job reads its own) are skipped, as are unset optional keys (None).
Choices among names (losses, crops, optimizers) are checked where they are
used, against the lists they select from.
"""

import math
from collections.abc import Callable
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """Config values that no run can use."""


def _is_number(value) -> bool:
  return (
    isinstance(value, int | float)
    and not isinstance(value, bool)
    and math.isfinite(value)
  )


def _integer(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


# A rule: (test of a value, what a valid value is).
Rule = tuple[Callable[[Any], bool], str]

POSITIVE_INT = (lambda v: _integer(v) and v > 0, 'a positive integer')
NON_NEGATIVE_INT = (lambda v: _integer(v) and v >= 0, 'an integer >= 0')
POSITIVE = (lambda v: _is_number(v) and v > 0, 'a number > 0')
NON_NEGATIVE = (lambda v: _is_number(v) and v >= 0, 'a number >= 0')
FRACTION = (lambda v: _is_number(v) and 0 <= v < 1, 'in [0, 1)')
PROBABILITY = (lambda v: _is_number(v) and 0 <= v <= 1, 'in [0, 1]')
MESH_AXIS = (
  lambda v: _integer(v) and (v > 0 or v == -1),
  'a positive integer, or -1 for the remaining devices',
)
INTEGER = (_integer, 'an integer')

# Dotted key -> the rule its value follows.
RULES: dict[str, Rule] = {
  'batch_size': POSITIVE_INT,
  'eval_batch_size': POSITIVE_INT,
  'image_size': POSITIVE_INT,
  'seed': INTEGER,
  'total_steps': POSITIVE_INT,
  'num_epochs': POSITIVE,
  'num_classes': POSITIVE_INT,
  'num_train_examples': POSITIVE_INT,
  'grad_accum_steps': POSITIVE_INT,
  'checkpoint_every': POSITIVE_INT,
  'keep_checkpoints': POSITIVE_INT,
  'log_every': POSITIVE_INT,
  'eval_every': NON_NEGATIVE_INT,
  'label_smoothing': FRACTION,
  'ema_decay': FRACTION,
  'shuffle_buffer': POSITIVE_INT,
  'prefetch': NON_NEGATIVE_INT,
  'lr.base': NON_NEGATIVE,
  'lr.warmup_steps': NON_NEGATIVE_INT,
  'lr.warmup_epochs': NON_NEGATIVE,
  'lr.warmup_init': NON_NEGATIVE,
  'lr.end': NON_NEGATIVE,
  'optimizer.b1': FRACTION,
  'optimizer.b2': FRACTION,
  'optimizer.eps': POSITIVE,
  'optimizer.momentum': FRACTION,
  'optimizer.weight_decay': NON_NEGATIVE,
  'optimizer.grad_clip_norm': NON_NEGATIVE,
  'mesh.data': MESH_AXIS,
  'mesh.model': POSITIVE_INT,
  'model.patch_size': POSITIVE_INT,
  'model.hidden_size': POSITIVE_INT,
  'model.num_layers': POSITIVE_INT,
  'model.mlp_dim': POSITIVE_INT,
  'model.num_heads': POSITIVE_INT,
  'model.representation_size': POSITIVE_INT,
  'model.dropout_rate': FRACTION,
  'model.attention_dropout_rate': FRACTION,
  'mpp.corrupt_rate': PROBABILITY,
  'mpp.mask_rate': PROBABILITY,
  'mpp.random_rate': PROBABILITY,
  'fewshot.every': NON_NEGATIVE_INT,
  'fewshot.seeds': POSITIVE_INT,
  'fewshot.l2_reg': POSITIVE,
  'pp.randaugment_layers': NON_NEGATIVE_INT,
  'pp.randaugment_magnitude': NON_NEGATIVE,
}
# Dotted key -> the rule every item of its sequence follows.
EACH_RULES: dict[str, Rule] = {
  'fewshot.shots': POSITIVE_INT,
  'lr_grid': POSITIVE,
}


def _lookup(config: ml_collections.ConfigDict, key: str):
  """The value at a dotted key; (False, None) if the config lacks it."""
  value = config
  for part in key.split('.'):
    if not isinstance(value, ml_collections.ConfigDict) or part not in value:
      return False, None
    value = value[part]
  return True, value


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """One line per value that breaks a rule, naming its key."""
  found = []
  for key, (test, wanted) in RULES.items():
    present, value = _lookup(config, key)
    if present and value is not None and not test(value):
      found.append(f'config.{key}={value!r} must be {wanted}')
  for key, (test, wanted) in EACH_RULES.items():
    present, values = _lookup(config, key)
    if present and values is not None:
      bad = [v for v in values if not test(v)]
      if bad or not values:
        found.append(
          f'config.{key}={values!r}: every item must be {wanted} (and '
          'there must be at least one)'
        )
  return found


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError listing every value that no run can use."""
  found = problems(config)
  if found:
    raise ConfigError(
      'Invalid config (fix these with --config.<key>=<value>):\n  '
      + '\n  '.join(found)
    )

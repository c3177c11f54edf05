"""Evaluators: built from `config.evals`, run by the loop and the jobs.

`config.evals` maps a name to an evaluator's config, as in big_vision:

  config.evals.test = dict(type='classification', split='test', every=500)
  config.evals.fewshot = dict(type='fewshot', datasets=('digits',), every=1000)

Each is built as `TYPES[type](context, name=name, **rest)` and its metrics
are logged as `<name>_<metric>`. The training loop also builds the
evaluators its older keys ask for (`training_evals`): 'eval' on
`config.eval_split` every `config.eval_every` steps and at the end, the
`config.test_split` at the end, and 'fewshot' every `config.fewshot.every`
steps on `config.fewshot.datasets`; an entry of `config.evals` with the
same name replaces one of these.
"""

import inspect
from collections.abc import Mapping
from typing import Any

import ml_collections

from vit_jax.config_utils import names
from vit_jax.evaluators.base import Context, Evaluator, dataset_config
from vit_jax.evaluators.classification import ClassificationEvaluator
from vit_jax.evaluators.fewshot import FewshotEvaluator

TYPES = {
  'classification': ClassificationEvaluator,
  'fewshot': FewshotEvaluator,
}

__all__ = [
  'TYPES',
  'ClassificationEvaluator',
  'Context',
  'Evaluator',
  'FewshotEvaluator',
  'dataset_config',
  'from_config',
  'training_evals',
]


def _as_dict(value: Any) -> dict[str, Any]:
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  return dict(value)


def training_evals(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """The evaluators of a training config: its older keys, then `evals`."""
  evals = {
    'eval': dict(
      type='classification', split=config.eval_split, every=config.eval_every
    )
  }
  if config.test_split:
    evals[config.test_split] = dict(
      type='classification', split=config.test_split
    )
  datasets = names(config.fewshot.datasets)
  if config.fewshot.every and datasets:
    evals['fewshot'] = dict(
      type='fewshot',
      datasets=datasets,
      shots=tuple(config.fewshot.shots),
      seeds=config.fewshot.seeds,
      l2_reg=config.fewshot.l2_reg,
      every=config.fewshot.every,
    )
  for name, spec in (config.get('evals') or {}).items():
    evals[name] = _as_dict(spec)
  return evals


def from_config(
  evals: Mapping[str, Mapping[str, Any]], context: Context
) -> list[Evaluator]:
  """Builds every evaluator of `evals` ({name: config with a 'type'})."""
  built = []
  for name, spec in evals.items():
    spec = dict(spec)
    kind = spec.pop('type', None)
    if kind not in TYPES:
      raise ValueError(
        f'config.evals.{name}.type={kind!r}; use one of {sorted(TYPES)}.'
      )
    if 'datasets' in spec:
      spec['datasets'] = names(spec['datasets'])
    accepted = set(inspect.signature(TYPES[kind]).parameters) - {'context'}
    unknown = sorted(set(spec) - accepted)
    if unknown:
      raise ValueError(
        f'config.evals.{name} has unknown keys {unknown}; a {kind!r} '
        f'evaluator takes {sorted(accepted - {"name"})}.'
      )
    built.append(TYPES[kind](context, name=name, **spec))
  return built

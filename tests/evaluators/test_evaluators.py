"""Evaluators chosen by `config.evals`, run by the unchanged loop."""

import json

import numpy as np
import pytest

from configs import digits
from vit_jax import evaluators
from vit_jax.jobs import pretrain


def tiny_digits_config():
  config = digits.get_config()
  config.model.hidden_size = 16
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.model.mlp_dim = 16
  config.num_epochs = None
  config.total_steps = 12
  config.batch_size = 32
  config.log_every = 6
  config.checkpoint_every = 6
  config.eval_every = 0
  config.export_npz = False
  return config


def test_a_second_periodic_evaluator_through_config_evals_alone(tmp_path):
  config = tiny_digits_config()
  # Classification on the test split every 4 steps, beside the default
  # validation evaluator; nothing else changes.
  config.evals = {
    'test_every4': dict(type='classification', split='test', every=4),
  }
  results = pretrain.run(config, str(tmp_path))
  records = [
    json.loads(line)
    for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()
  ]
  steps_logged = [r['step'] for r in records if 'test_every4_accuracy' in r]
  # Every 4 steps before the end, and once more with the final results.
  assert steps_logged == [4, 8, 12]
  final = [r for r in records if r['step'] == 12 and 'eval_accuracy' in r]
  assert final and 'test_accuracy' in final[0]
  # The same split, the same weights at the end: the same accuracy as the
  # built-in test evaluator.
  assert results['test_every4_accuracy'] == results['test_accuracy']
  assert 0.0 <= results['test_every4_accuracy'] <= 1.0


def test_standard_evaluators_follow_the_older_keys():
  config = tiny_digits_config()
  config.eval_every = 7
  config.fewshot.every = 3
  config.fewshot.datasets = ('digits,digits_again',)
  evals = evaluators.training_evals(config)
  assert evals['eval'] == dict(type='classification', split='val', every=7)
  assert evals['test'] == dict(type='classification', split='test')
  assert evals['fewshot']['every'] == 3
  assert evals['fewshot']['datasets'] == ['digits', 'digits_again']
  config.evals = {'eval': dict(type='classification', split='test', every=1)}
  assert evaluators.training_evals(config)['eval']['split'] == 'test'


def test_bad_evaluator_configs_are_named(tmp_path):
  config = tiny_digits_config()
  config.evals = {'mine': dict(type='nope')}
  with pytest.raises(ValueError, match=r'config.evals.mine.type'):
    pretrain.run(config, str(tmp_path / 'a'))
  config.evals = {'mine': dict(type='classification', splitt='test')}
  with pytest.raises(ValueError, match=r"unknown keys \['splitt'\]"):
    pretrain.run(config, str(tmp_path / 'b'))


def test_fewshot_evaluator_runs_in_training(tmp_path):
  config = tiny_digits_config()
  config.evals = {
    'probe': dict(type='fewshot', datasets='digits', shots=(2,), every=6),
  }
  pretrain.run(config, str(tmp_path))
  records = [
    json.loads(line)
    for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()
  ]
  (probe,) = [r for r in records if 'probe_digits_2shot' in r]
  assert probe['step'] == 6
  assert 0.0 <= probe['probe_digits_2shot'] <= 1.0
  assert np.isfinite(probe['probe_digits_2shot'])

"""The evaluation and inspection jobs end to end on a tiny digits model.

Every job runs on the orbax checkpoint of a short pretraining run and on a
published-layout .npz of the same weights saved without a description (so
the architecture comes from the config and the resolution from the position
embeddings); its numbers are checked against ones computed here directly.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from sklearn import datasets as sk_datasets
from test_pretrain import tiny_config

import main
import mock_tfds
from configs import evaluate as evaluate_config
from configs import fewshot as fewshot_config
from configs import flops as flops_config
from configs import inspect as inspect_config
from configs import predict as predict_config
from helpers import COMPILATION_CACHE_FLAG, init_params
from vit_jax import checkpoints, config_utils, data, eval_step, sharding, steps
from vit_jax.evaluators import classification
from vit_jax.evaluators import fewshot as fewshot_evaluator
from vit_jax.jobs import common, evaluate, predict, pretrain
from vit_jax.jobs import fewshot as fewshot_job
from vit_jax.jobs import flops as flops_job
from vit_jax.jobs import inspect as inspect_job
from vit_jax.models import get_model

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
SOURCES = ('workdir', 'npz')


def architecture():
  """The tiny model's registry name and attributes."""
  config = tiny_config()
  overrides = {k: v for k, v in config.model.to_dict().items() if v is not None}
  return config.model_name, overrides


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A short pretraining run with few-shot probes every 50 steps."""
  workdir = tmp_path_factory.mktemp('tiny_digits')
  config = tiny_config(
    total_steps=100,
    log_every=50,
    checkpoint_every=1000,
    **{
      'lr.warmup_steps': 20,
      'fewshot.every': 50,
      'fewshot.datasets': ('digits',),
      'fewshot.shots': (1, 5),
      'fewshot.seeds': 1,
    },
  )
  pretrain.run(config, str(workdir))
  return workdir


@pytest.fixture(scope='module')
def bare_npz(trained):
  """The same weights as a published-layout .npz without a description."""
  variables, _ = checkpoints.training.load_variables(trained)
  path = trained / 'bare' / 'tiny.npz'
  checkpoints.save_npz(path, variables['params'])
  assert not path.with_suffix('.json').exists()
  return path


def job_config(config_module, source, trained, bare_npz, **overrides):
  """A job's config on the workdir, or on the bare .npz (with the
  architecture given as on the command line)."""
  config = config_module.get_config()
  if source == 'workdir':
    config.init = str(trained)
  else:
    config.init = str(bare_npz)
    name, attributes = architecture()
    config.model_name = name
    for key in common.MODEL_KEYS:
      if key in attributes:
        config.model[key] = attributes[key]
  for key, value in overrides.items():
    config[key] = value
  return config


def direct_logits(trained, images):
  """The model's logits, built and applied here without the jobs' code."""
  name, attributes = architecture()
  model = get_model(name, 10, **attributes)
  variables, _ = checkpoints.training.load_variables(trained)
  return np.asarray(model.apply(variables, jnp.asarray(images), train=False))


def digits_test_split():
  """The digits test split at 8 px, as numpy (images, integer labels)."""
  config = data.default_config()
  config.image_size = 8
  config.eval_batch_size = 64
  ds = data.get_dataset(config, sharding.create_mesh())
  batches = list(ds.local_eval_iter('test'))
  keep = np.concatenate([b['mask'] for b in batches]) > 0
  images = np.concatenate([b['images'] for b in batches])[keep]
  labels = np.concatenate([b['labels'] for b in batches])[keep].argmax(1)
  return images, labels


def random_checkpoint(num_classes, **changes):
  """A randomly initialised tiny ViT's params and model description."""
  name, attributes = architecture()
  attributes.update(changes)
  model = get_model(name, num_classes, **attributes)
  params = init_params(model, jnp.zeros((1, 8, 8, 3)))
  description = {
    'model_name': name,
    'num_classes': num_classes,
    'image_size': 8,
    'overrides': attributes,
  }
  return params, description


def assert_readable_png(path):
  path = Path(path)
  assert path.read_bytes()[:8] == PNG_SIGNATURE, path
  pixels = np.asarray(Image.open(path).convert('RGB')).reshape(-1, 3)
  assert len(np.unique(pixels, axis=0)) > 1, f'{path} has a single colour'


# ----------------------------------------------------------------------------
# Wiring.


@pytest.mark.parametrize(
  'config_module',
  [evaluate_config, fewshot_config, inspect_config, predict_config,
   flops_config],
)  # fmt: skip
def test_every_config_names_a_job_with_a_run_function(config_module):
  job = config_module.get_config().job
  assert job in main.JOBS
  assert callable(importlib.import_module(f'vit_jax.jobs.{job}').run)


def test_a_checkpoint_is_required(tmp_path):
  with pytest.raises(ValueError, match=r'Set --config\.init'):
    evaluate.run(evaluate_config.get_config(), str(tmp_path))


def test_a_bare_npz_needs_the_model_name(bare_npz, tmp_path):
  config = evaluate_config.get_config()
  config.init = str(bare_npz)
  with pytest.raises(ValueError, match=r'set --config\.model_name'):
    evaluate.run(config, str(tmp_path))


def test_comma_separated_names():
  assert config_utils.names(('digits,cifar10', 'dtd')) == [
    'digits', 'cifar10', 'dtd'
  ]  # fmt: skip
  assert config_utils.names('a.png, b.png') == ['a.png', 'b.png']
  assert config_utils.names(()) == []


# ----------------------------------------------------------------------------
# evaluate.


@pytest.mark.parametrize('source', SOURCES)
def test_evaluate_equals_the_accuracy_of_the_logits(
  source, trained, bare_npz, tmp_path
):
  config = job_config(evaluate_config, source, trained, bare_npz)
  results = evaluate.run(config, str(tmp_path))

  images, labels = digits_test_split()
  expected = np.mean(direct_logits(trained, images).argmax(1) == labels)
  assert results['examples'] == len(labels) == 360
  assert results['image_size'] == 8
  assert results['accuracy'] == pytest.approx(expected, abs=1e-9)
  written = json.loads((tmp_path / 'evaluate.json').read_text())
  assert written['accuracy'] == results['accuracy']


def test_real_accuracy_counts_label_sets_and_skips_empty_ones():
  logits = jnp.asarray(np.eye(4)[[0, 1, 2, 3, 0]] * 5.0)
  labels = jnp.asarray(
    [[1, 0, 1, 0],  # predicted 0: in the set
     [0, 0, 1, 1],  # predicted 1: not in the set
     [0, 0, 0, 0],  # empty set: not counted
     [0, 1, 0, 1],  # predicted 3: in the set
     [1, 0, 0, 0]],  # padding
    jnp.float32,
  )  # fmt: skip
  mask = jnp.asarray([1.0, 1, 1, 1, 0])
  metrics = classification.counted(
    eval_step.classification_metrics(steps.get_loss('sigmoid_xent')),
    labels=True,
  )
  totals = metrics.summarize(jax.device_get(metrics.sums(logits, labels, mask)))
  # Label sets: reported as ReaL accuracy.
  assert totals['real_accuracy'] == pytest.approx(2 / 3)
  assert 'accuracy' not in totals
  assert totals['examples'] == 3 and totals['seen'] == 4


def test_evaluate_on_imagenet_real_label_sets(tmp_path, monkeypatch):
  # A model that always predicts class 7: its ReaL accuracy is the share
  # of non-empty label sets holding 7.
  params, description = random_checkpoint(1000)
  params['head'] = {
    'kernel': np.zeros_like(params['head']['kernel']),
    'bias': 10.0 * np.eye(1000, dtype=np.float32)[7],
  }
  path = tmp_path / 'real.npz'
  checkpoints.save_npz(path, params, description=description)

  with mock_tfds.mocked_tfds():
    features = tfds.builder('imagenet2012_real').info.features
    examples = [dict(ex) for ex in mock_tfds.examples_of('imagenet2012_real', features)]  # fmt: skip
    for i, ex in enumerate(examples):
      others = [c for c in ex['real_label'] if c != 7][:3]
      if i % 5 == 0:
        ex['real_label'] = np.zeros((0,), np.int64)
      elif i % 3 == 0:
        ex['real_label'] = np.asarray([*others, 7], np.int64)
      else:
        ex['real_label'] = np.asarray(others, np.int64)
    monkeypatch.setitem(mock_tfds._EXAMPLES, 'imagenet2012_real', examples)
    config = evaluate_config.get_config()
    config.init = str(path)
    config.dataset = 'imagenet2012_real'
    config.eval_batch_size = 64
    results = evaluate.run(config, str(tmp_path / 'out'))

  scored = [ex['real_label'] for ex in examples if len(ex['real_label'])]
  expected = np.mean([7 in labels for labels in scored])
  assert 'accuracy' not in results
  assert results['real_accuracy'] == pytest.approx(expected)
  assert results['examples'] == len(examples)
  assert results['examples_scored'] == len(scored)


# ----------------------------------------------------------------------------
# fewshot.


def test_pretraining_logs_periodic_fewshot_probes(trained):
  rows = [
    json.loads(line)
    for line in (trained / 'metrics.jsonl').read_text().splitlines()
  ]
  probes = [row for row in rows if 'fewshot_digits_5shot' in row]
  assert [row['step'] for row in probes] == [50]
  assert probes[0]['fewshot_digits_1shot'] > 0.15  # Chance is 0.1.
  assert probes[0]['fewshot_digits_5shot'] > 0.3


@pytest.mark.parametrize('source', SOURCES)
def test_fewshot_command_beats_chance(source, trained, bare_npz, tmp_path):
  config = job_config(fewshot_config, source, trained, bare_npz)
  config.fewshot.shots = (1, 5, 10)
  config.fewshot.seeds = 2
  results = fewshot_job.run(config, str(tmp_path))

  written = json.loads((tmp_path / 'fewshot.json').read_text())
  accuracy = written['accuracy']['digits']
  assert set(accuracy) == {'1', '5', '10'}
  assert min(accuracy.values()) > 0.2  # Chance is 0.1.
  assert accuracy['10'] > accuracy['1']
  assert written['metrics'] == results['metrics']
  assert written['metrics']['fewshot_digits_10shot'] == accuracy['10']


def test_metric_names_are_identifiers():
  assert fewshot_evaluator.metric_name('vtab/dmlab', 5) == 'vtab_dmlab_5shot'
  assert (
    fewshot_evaluator.metric_name('tfds:cifar10', 1) == 'tfds_cifar10_1shot'
  )


# ----------------------------------------------------------------------------
# inspect.


@pytest.mark.parametrize('source', SOURCES)
def test_inspect_writes_the_four_figures(source, trained, bare_npz, tmp_path):
  config = job_config(
    inspect_config, source, trained, bare_npz, num_images=32,
    rollout_images=4,
  )  # fmt: skip
  inspect_job.run(config, str(tmp_path))

  for name in (
    inspect_job.FILTERS,
    inspect_job.POSITIONS,
    inspect_job.DISTANCES,
    inspect_job.ROLLOUT,
  ):
    assert_readable_png(tmp_path / name)
  results = json.loads((tmp_path / 'inspect.json').read_text())
  assert results['skipped'] == {}
  assert results['num_images'] == 32
  distances = np.asarray(results['mean_attention_distance'])
  assert distances.shape == (2, 2)  # (layers, heads)
  # Centres of a 2x2 grid of 4-pixel patches are 4 or 5.7 pixels apart.
  assert np.all((distances >= 0) & (distances <= 4 * np.sqrt(2)))
  assert np.asarray(results['rollout_maps']).shape == (4, 2, 2)


def test_inspect_skips_the_rollout_without_a_class_token(tmp_path):
  path = tmp_path / 'gap.npz'
  params, description = random_checkpoint(10, classifier='gap')
  checkpoints.save_npz(path, params, description=description)
  config = inspect_config.get_config()
  config.init = str(path)
  config.num_images = 8
  results = inspect_job.run(config, str(tmp_path / 'out'))

  assert set(results['skipped']) == {inspect_job.ROLLOUT}
  assert 'no class token' in results['skipped'][inspect_job.ROLLOUT]
  assert not (tmp_path / 'out' / inspect_job.ROLLOUT).exists()
  for name in (inspect_job.FILTERS, inspect_job.POSITIONS,
               inspect_job.DISTANCES):  # fmt: skip
    assert_readable_png(tmp_path / 'out' / name)


# ----------------------------------------------------------------------------
# predict.


@pytest.fixture(scope='module')
def digit_files(tmp_path_factory):
  """Three digits as image files: two 8x8 PNGs and one 16x16 PNG."""
  directory = tmp_path_factory.mktemp('digit_files')
  scans = sk_datasets.load_digits().images[:3]
  paths = []
  for i, scan in enumerate(scans):
    grey = np.round(scan * 255 / 16).astype(np.uint8)
    image = Image.fromarray(np.repeat(grey[..., None], 3, -1))
    if i == 2:
      image = image.resize((16, 16), Image.NEAREST)
    path = directory / f'digit_{i}.png'
    image.save(path)
    paths.append(path)
  return paths


@pytest.mark.parametrize('source', SOURCES)
def test_predict_top_k_matches_the_models_argmax(
  source, trained, bare_npz, digit_files, tmp_path
):
  config = job_config(
    predict_config, source, trained, bare_npz,
    images=','.join(map(str, digit_files)), top_k=3, dataset='digits',
  )  # fmt: skip
  results = predict.run(config, str(tmp_path))

  # Evaluation's preprocessing by hand: bilinear resize, then [-1, 1].
  pixels = [np.asarray(Image.open(p).convert('RGB')) for p in digit_files]
  images = np.stack(
    [tf.image.resize(p, [8, 8], 'bilinear').numpy() / 127.5 - 1 for p in pixels]
  )
  expected = direct_logits(trained, images).argmax(1)
  written = json.loads((tmp_path / 'predictions.json').read_text())
  assert written == json.loads(json.dumps(results))
  assert written['class_names'] == 'digits'
  for prediction, label in zip(written['predictions'], expected, strict=True):
    top = prediction['top_k']
    probs = [entry['probability'] for entry in top]
    assert len(top) == 3
    assert sum(probs) <= 1 + 1e-9
    assert probs == sorted(probs, reverse=True)
    assert top[0]['label'] == label
    assert top[0]['class'] == str(label)  # The digits' class names.


def test_predict_class_names_from_a_file(trained, digit_files, tmp_path):
  names = tmp_path / 'names.txt'
  words = [f'digit {i}' for i in range(10)]
  names.write_text('\n'.join(words) + '\n')
  config = predict_config.get_config()
  config.init = str(trained)
  config.images = str(digit_files[0])
  config.class_names = str(names)
  results = predict.run(config, str(tmp_path / 'out'))
  top = results['predictions'][0]['top_k']
  assert top[0]['class'] == words[top[0]['label']]
  assert len(top) == 5

  names.write_text('cat\ndog\n')
  with pytest.raises(ValueError, match='gives 2 class names'):
    predict.run(config, str(tmp_path / 'out'))


def test_predict_through_main(trained, digit_files, tmp_path):
  command = [
    sys.executable,
    str(ROOT / 'main.py'),
    f'--config={ROOT / "configs/predict.py"}',
    f'--config.init={trained / "model.npz"}',
    f'--config.images={digit_files[0]},{digit_files[1]}',
    '--config.dataset=digits',
    '--config.top_k=2',
    f'--workdir={tmp_path}',
    COMPILATION_CACHE_FLAG,
  ]
  run = subprocess.run(
    command, capture_output=True, text=True, timeout=300, check=False
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'probability' in run.stdout
  assert str(digit_files[1]) in run.stdout
  written = json.loads((tmp_path / 'predictions.json').read_text())
  assert [len(p['top_k']) for p in written['predictions']] == [2, 2]


# ----------------------------------------------------------------------------
# flops.


def test_flops_command_reproduces_the_papers_column(tmp_path):
  config = flops_config.get_config()
  config.models = 'ViT-B_16,BiT-R50x1'
  results = flops_job.run(config, str(tmp_path))

  rows = json.loads((tmp_path / 'flops.json').read_text())['results_table']
  assert len(rows) == 18
  for row in rows:
    assert abs(row['exaflops'] / row['paper_exaflops'] - 1) < 0.1, row
  assert results['max_abs_rel_diff'] < 0.1
  models = {row['model']: row for row in results['models']}
  assert models['ViT-B_16']['params'] == 86_567_656
  assert models['ViT-B_16']['gflops'] == pytest.approx(35.1, rel=0.01)
  markdown = (tmp_path / 'flops.md').read_text()
  assert markdown.count('| ViT-H_14 | 14 |') == 1
  assert '| BiT-R50x1 |' in markdown


def test_flops_of_a_resolution_the_patches_do_not_tile():
  (row,) = flops_job.model_rows(['ViT-H_14'], 384, 1000)
  assert 'multiple of the patch size' in row['error']

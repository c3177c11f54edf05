"""Few-shot linear evaluation (paper §4): a job, and probes during training.

  python main.py --config=configs/fewshot.py --config.init=CKPT \
      --config.fewshot.datasets=digits,cifar10 --workdir=DIR

For each dataset, the frozen pre-logits features of its 'train' split (the
pool the k-shot sets are drawn from) and of its 'test' split (scored) are
computed, images preprocessed at the checkpoint's resolution with the
evaluation preprocessing; `fewshot.fewshot_evaluate` then fits the
closed-form regularised least-squares probe for every k of
`config.fewshot.shots` and averages its test accuracy over
`config.fewshot.seeds`. Writes DIR/fewshot.json.

In pretraining, `with_periodic_probes` runs the same probes every
`config.fewshot.every` steps on `config.fewshot.datasets` and logs them like
the other metrics, as `fewshot_<dataset>_<k>shot`.
"""

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from vit_jax import checkpoint_jobs, data, fewshot, loop, sharding

TRAIN_SPLIT = 'train'  # The pool of few-shot examples.
TEST_SPLIT = 'test'  # What the probe is scored on.

FeatureFn = Callable[[Any, Any], Any]


def metric_name(dataset: str, shots: int) -> str:
  """'fewshot_<dataset>_<k>shot', the dataset's name made identifier-safe."""
  safe = re.sub(r'[^0-9A-Za-z]+', '_', dataset).strip('_')
  return f'fewshot_{safe}_{shots}shot'


def probe(
  features_fn: FeatureFn,
  variables: Any,
  datasets: Mapping[str, data.Dataset],
  fewshot_config: ml_collections.ConfigDict,
) -> dict[str, float]:
  """Few-shot accuracies of a model's features on datasets.

  Args:
    features_fn: (variables, images) -> pre-logits features.
    variables: the model's variables.
    datasets: name -> dataset, at the model's resolution.
    fewshot_config: `shots`, `seeds` and `l2_reg`.

  Returns:
    {metric_name(dataset, k): mean accuracy over seeds}.
  """
  results = {}
  for name, ds in datasets.items():
    train = fewshot.extract_features(
      features_fn, variables, ds.eval_iter(TRAIN_SPLIT)
    )
    test = fewshot.extract_features(
      features_fn, variables, ds.eval_iter(TEST_SPLIT)
    )
    accuracies = fewshot.fewshot_evaluate(
      *train,
      *test,
      shots=tuple(fewshot_config.shots),
      seeds=fewshot_config.seeds,
      l2_reg=fewshot_config.l2_reg,
      num_classes=ds.num_classes,
    )
    for shots, accuracy in accuracies.items():
      results[metric_name(name, shots)] = accuracy
  return results


def _datasets(config, names, image_size, mesh) -> dict[str, data.Dataset]:
  if not names:
    raise ValueError(
      'No few-shot datasets: set --config.fewshot.datasets (e.g. '
      'digits,cifar10).'
    )
  return {
    name: data.get_dataset(
      checkpoint_jobs.dataset_config(config, name, image_size), mesh
    )
    for name in names
  }


def with_periodic_probes(
  make_task: Callable[[ml_collections.ConfigDict, data.Dataset], loop.Task],
) -> Callable[[ml_collections.ConfigDict, data.Dataset], loop.Task]:
  """Wraps a job's `make_task` to add few-shot probes to its Task.

  With `config.fewshot.every` > 0 and `config.fewshot.datasets` set, the
  Task's `extra_eval` probes the (EMA) parameters on those datasets at
  `config.image_size` every `config.fewshot.every` steps; otherwise the
  Task is unchanged. The features are the pre-logits of the Task's model
  description, so a self-supervised model's encoder is probed too.
  """

  def make_task_with_probes(config, ds):
    task = make_task(config, ds)
    names = checkpoint_jobs.names(config.fewshot.datasets)
    if not config.fewshot.every or not names:
      return task
    # The mesh the loop builds from the same keys.
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.model)
    datasets = _datasets(config, names, config.image_size, mesh)
    description = task.description
    features_fn = fewshot.pre_logits_fn(
      description['model_name'], **description['overrides']
    )
    use_ema = config.ema_decay > 0

    def extra_eval(state):
      return probe(
        features_fn, state.variables(ema=use_ema), datasets, config.fewshot
      )

    return dataclasses.replace(
      task, extra_eval=extra_eval, extra_eval_every=config.fewshot.every
    )

  return make_task_with_probes


def format_table(results: Mapping[str, float], names, shots) -> str:
  """Accuracies as a Markdown table: a row per dataset, a column per k."""
  lines = [
    '| dataset | ' + ' | '.join(f'{k}-shot' for k in shots) + ' |',
    '|---|' + '---|' * len(shots),
  ]
  for name in names:
    cells = [f'{100 * results[metric_name(name, k)]:.1f}' for k in shots]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  ckpt = checkpoint_jobs.start(config, workdir)
  names = checkpoint_jobs.names(config.fewshot.datasets)
  datasets = _datasets(ckpt.config, names, ckpt.image_size, ckpt.mesh)
  headless = ckpt.model.clone(num_classes=None)

  def features_fn(variables, images):
    return headless.apply(variables, images, train=False)

  with ckpt.activation_sharding():
    metrics = probe(features_fn, ckpt.on_mesh(), datasets, config.fewshot)
  shots = tuple(config.fewshot.shots)
  results = {
    'model': ckpt.model_name,
    'checkpoint': config.init,
    'image_size': ckpt.image_size,
    'shots': shots,
    'seeds': config.fewshot.seeds,
    'l2_reg': config.fewshot.l2_reg,
    'accuracy': {
      name: {str(k): metrics[metric_name(name, k)] for k in shots}
      for name in names
    },
    'metrics': metrics,
  }
  checkpoint_jobs.write_json(workdir, 'fewshot.json', results)
  table = format_table(metrics, names, shots)
  print(f'Few-shot accuracy (%) of {ckpt.model_name}:\n{table}')
  return results

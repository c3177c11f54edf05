"""The fewshot job: few-shot linear evaluation of a checkpoint (paper §4).

  python main.py --config=configs/fewshot.py --config.init=CKPT \
      --config.fewshot.datasets=digits,cifar10 --workdir=DIR

Runs the few-shot evaluator once (vit_jax/evaluators/fewshot.py) on the
checkpoint's frozen pre-logits features at its resolution. Writes
DIR/fewshot.json.
"""

from collections.abc import Mapping
from typing import Any

import ml_collections

from vit_jax import config_utils, evaluators
from vit_jax import workdir as workdir_lib
from vit_jax.evaluators.fewshot import metric_name
from vit_jax.jobs import common


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
  loaded = common.start(config, workdir)
  names = config_utils.names(config.fewshot.datasets)
  shots = tuple(config.fewshot.shots)
  evaluator = evaluators.FewshotEvaluator(
    loaded.eval_context(),
    name='fewshot',
    datasets=names,
    shots=shots,
    seeds=config.fewshot.seeds,
    l2_reg=config.fewshot.l2_reg,
  )
  metrics = evaluator.run(loaded.on_mesh())
  results = {
    'model': loaded.model_name,
    'checkpoint': config.init,
    'image_size': loaded.image_size,
    'shots': shots,
    'seeds': config.fewshot.seeds,
    'l2_reg': config.fewshot.l2_reg,
    'accuracy': {
      name: {str(k): metrics[metric_name(name, k)] for k in shots}
      for name in names
    },
    'metrics': {f'fewshot_{key}': value for key, value in metrics.items()},
  }
  workdir_lib.write_json(workdir, 'fewshot.json', results)
  table = format_table(metrics, names, shots)
  print(f'Few-shot accuracy (%) of {loaded.model_name}:\n{table}')
  return results

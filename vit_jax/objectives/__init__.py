"""What a training job learns: the Task it hands the loop.

`make_task(config, ds)` builds the Task of `config.objective`:
'supervised' (the labels, `supervised.py`) or 'masked_patch_prediction'
(self-supervised, `mpp.py`).
"""

import ml_collections

from vit_jax import data
from vit_jax.objectives import mpp, supervised
from vit_jax.objectives.task import Task, model_from_config

OBJECTIVES = {
  supervised.OBJECTIVE: supervised.make_task,
  mpp.OBJECTIVE: mpp.make_task,
}

__all__ = ['OBJECTIVES', 'Task', 'make_task', 'model_from_config']


def make_task(config: ml_collections.ConfigDict, ds: 'data.Dataset') -> Task:
  """The Task of `config.objective`."""
  if config.objective not in OBJECTIVES:
    raise ValueError(
      f'config.objective={config.objective!r}; use one of {sorted(OBJECTIVES)}.'
    )
  return OBJECTIVES[config.objective](config, ds)

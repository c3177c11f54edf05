"""The pretraining job: a model trained from scratch on the shared loop.

`config.objective` picks what it learns (vit_jax/objectives): 'supervised'
(the labels) or 'masked_patch_prediction' (self-supervised).
"""

import ml_collections

from vit_jax import loop, objectives


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  return loop.train_and_evaluate(config, workdir, objectives.make_task)

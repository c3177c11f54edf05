"""The evaluator interface and what every evaluator is built from.

An evaluator is built from its own config (a dict of `config.evals`) and a
`Context`, and `run(variables)` returns its metrics; `every` (steps; 0 for
never during training) and `final` (also after the last step) say when the
training loop runs it. Jobs that evaluate a checkpoint run the same
evaluators once.
"""

import copy
import dataclasses
from typing import Any, Protocol

import flax.linen as nn
import ml_collections
from jax.sharding import Mesh

from vit_jax import data, sharding
from vit_jax.objectives.task import Task

PyTree = Any


class Evaluator(Protocol):
  """What the loop and the evaluation jobs run."""

  name: str
  every: int
  final: bool

  def run(self, variables: PyTree) -> dict[str, Any]: ...


def dataset_config(
  config: ml_collections.ConfigDict, dataset: str, image_size: int
) -> ml_collections.ConfigDict:
  """The data config of another dataset at a resolution.

  Split overrides in `config.splits` are kept for `config.dataset` and
  dropped for any other dataset, whose own defaults apply.
  """
  config = copy.deepcopy(config)
  if dataset != config.dataset:
    for split in config.splits:
      config.splits[split] = None
    config.dataset = dataset
  config.image_size = image_size
  return config


@dataclasses.dataclass
class Context:
  """What evaluators share: the model being evaluated and where.

  Attributes:
    task: the model, its loss, targets and evaluation metrics.
    mesh: the device mesh; variables handed to `run` are placed on it.
    config: the job config: data keys (`dataset`, `splits`, batch sizes,
      preprocessing), `image_size`, `sharding` and `seed`.
    datasets: datasets already built, by name (the job's own, typically).
  """

  task: Task
  mesh: Mesh
  config: ml_collections.ConfigDict
  datasets: dict[str, data.Dataset] = dataclasses.field(default_factory=dict)

  @property
  def model(self) -> nn.Module:
    return self.task.model

  def dataset(self, name: str | None = None) -> data.Dataset:
    """A dataset (default: the job's) at the model's resolution, cached."""
    name = name or self.config.dataset
    if name not in self.datasets:
      self.datasets[name] = data.get_dataset(
        dataset_config(self.config, name, self.config.image_size), self.mesh
      )
    return self.datasets[name]

  def activation_sharding(self):
    """The context model code is traced in (see `sharding`)."""
    return sharding.activation_sharding(self.mesh, self.config.sharding)

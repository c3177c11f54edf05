"""What the jobs that read a checkpoint share: config, loading and output.

  config = common.default_config('evaluate')  # in configs/*.py
  loaded = common.start(config, workdir)  # model, variables, mesh
  ds = loaded.dataset()  # config.dataset at the checkpoint's resolution

`config.init` is anything `vit_jax.checkpoints.load` reads: a workdir or
orbax checkpoint directory of this project, a weights file (a published,
AugReg, big_vision or exported .npz, a timm or transformers .safetensors or
hub snapshot) or a published name (`augreg:<file>`, `imagenet21k:<model>`). Without a description, `config.model_name` and the
`config.model` overrides name the architecture, and the resolution is read
from the position embeddings.
"""

import copy
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh
from ml_collections import config_dict

from vit_jax import checkpoints, data, evaluators, models, sharding, steps
from vit_jax import workdir as workdir_lib
from vit_jax.models import shapes
from vit_jax.models.description import ModelDescription
from vit_jax.objectives import Task

PyTree = Any
# Model attributes settable on the command line (None keeps the registry's
# or the description's value): the architecture of a checkpoint without a
# description that differs from its registry entry (e.g. the digits model's
# 4x4 patches and 4 layers), how it computes (dtype, attention, matmul and patch-embedding kernels) and
# how its weights were trained (GELU, position embedding).
MODEL_KEYS = {
  'patch_size': int,
  'hidden_size': int,
  'num_layers': int,
  'num_heads': int,
  'mlp_dim': int,
  'classifier': str,
  'resnet_stages': tuple,
  'resnet_width': float,
  'gelu_approximate': bool,
  'posemb': str,
  'attention': str,
  'matmul': str,
  'patch_embedding': str,
  'dtype': str,
}


def default_config(job: str) -> ml_collections.ConfigDict:
  """The keys every checkpoint-reading job has, with their defaults."""
  config = ml_collections.ConfigDict()
  config.job = job
  config.init = config_dict.placeholder(str)  # the checkpoint (required)
  # Where published names (--config.init=augreg:...) are cached; None:
  # $VIT_JAX_WEIGHTS, else ~/.cache/vit_jax/weights.
  config.weights_cache = config_dict.placeholder(str)
  config.ema = False  # read the Polyak-averaged weights of an orbax checkpoint
  # Needed only for a checkpoint without a description (a bare .npz).
  config.model_name = config_dict.placeholder(str)
  config.model = ml_collections.ConfigDict(
    {key: config_dict.placeholder(kind) for key, kind in MODEL_KEYS.items()}
  )
  config.update(data.default_config())
  # None: the checkpoint's own resolution. Another one resizes the position
  # embeddings to the new patch grid (bilinear, as for fine-tuning).
  config.image_size = config_dict.placeholder(int)
  config.sharding = 'dp'  # 'dp', 'fsdp' or 'tp' (see vit_jax/sharding.py)
  config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  return config


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A checkpoint's model on a mesh, ready to run.

  Attributes:
    model: the Flax module, with the checkpoint's head (if it has one).
    variables: its variables as host numpy arrays, fitted to `model` at
      `image_size`; `on_mesh` places them on the devices.
    description: the checkpoint's model description (`image_size` the
      resolution the job runs at).
    config: the job config, with `image_size` resolved.
    mesh: the device mesh.
  """

  model: nn.Module
  variables: dict[str, PyTree]
  description: ModelDescription
  config: ml_collections.ConfigDict
  mesh: Mesh

  @property
  def model_name(self) -> str:
    return self.description.model_name

  @property
  def image_size(self) -> int:
    return self.description.image_size

  @property
  def has_class_token(self) -> bool:
    return getattr(self.model, 'classifier', None) in (
      'token',
      'token_unpooled',
    )

  def on_mesh(self) -> dict[str, PyTree]:
    """The variables on the mesh, sharded as `config.sharding` says."""
    shardings = sharding.tree_shardings(
      shapes.abstract_variables(self.model, self.image_size, boxed=True),
      self.mesh,
      self.config.sharding,
    )
    return jax.device_put(self.variables, shardings)

  def activation_sharding(self):
    """The context to trace model code in (see `sharding`)."""
    return sharding.activation_sharding(self.mesh, self.config.sharding)

  def dataset(self, name: str | None = None) -> data.Dataset:
    """A dataset (default `config.dataset`) at the checkpoint's resolution."""
    name = name or self.config.dataset
    return data.get_dataset(
      evaluators.dataset_config(self.config, name, self.image_size), self.mesh
    )

  def eval_context(self) -> evaluators.Context:
    """What evaluators of this model are built from."""
    task = Task(
      model=self.model,
      loss_fn=steps.get_loss(self.config.loss),
      description=self.description,
    )
    return evaluators.Context(task, self.mesh, self.config)

  def require_head(self, job: str) -> int:
    """The number of classes; raises if the checkpoint has no head."""
    if not getattr(self.model, 'num_classes', None):
      raise ValueError(
        f'{self.config.init} has no classification head, which the {job} '
        'job needs (e.g. a masked-patch-prediction checkpoint); fine-tune '
        'it first (configs/finetune.py), or use the fewshot or inspect jobs.'
      )
    return self.model.num_classes


def load(config: ml_collections.ConfigDict) -> LoadedModel:
  """Loads `config.init` and builds its model and the mesh.

  Raises:
    ValueError: `config.init` is not set, or the resolution cannot be
      known (a description-less checkpoint of a model without position
      embeddings and no `config.image_size`).
    checkpoints.CheckpointMismatchError: the parameters do not fit the
      model (a wrong `config.model_name` or `config.model` override).
  """
  if not config.init:
    raise ValueError(
      'Set --config.init to a checkpoint: a .npz file, an orbax checkpoint '
      'directory, or a training workdir.'
    )
  loaded = checkpoints.load(
    config.init,
    model_name=config.model_name,
    ema=config.ema,
    image_size=config.image_size,
    weights_cache=config.get('weights_cache'),
    **models.config_overrides(config.model),
  )
  config = copy.deepcopy(config)
  config.image_size = loaded.description.image_size
  return LoadedModel(
    model=loaded.model,
    variables=loaded.variables,
    description=loaded.description,
    config=config,
    mesh=sharding.create_mesh(config.mesh.data, config.mesh.model),
  )


def start(config: ml_collections.ConfigDict, workdir: str) -> LoadedModel:
  """Creates the workdir, records the config there and loads the checkpoint."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_config(workdir, config)
  return load(config)

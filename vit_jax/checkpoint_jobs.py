"""What the jobs that read a checkpoint share: config, loading and output.

  config = checkpoint_jobs.default_config('evaluate')  # in configs/*.py
  ckpt = checkpoint_jobs.start(config, workdir)  # model, variables, mesh
  ds = ckpt.dataset()  # config.dataset at the checkpoint's resolution
  checkpoint_jobs.write_json(workdir, 'evaluate.json', results)

`config.init` is anything `transfer.load_checkpoint` reads: a published-
layout .npz (with or without this project's `<name>.json` description), an
orbax checkpoint directory, or a workdir with checkpoints/. Without a
description, `config.model_name` and the `config.model` overrides name the
architecture, and the resolution is read from the position embeddings.
"""

import copy
import dataclasses
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh
from ml_collections import config_dict

from vit_jax import (
  checkpoints,
  data,
  inspection,
  loop,
  models,
  sharding,
  transfer,
)
from vit_jax.models import VisionTransformer

PyTree = Any

# Model attributes settable on the command line (None keeps the registry's
# or the description's value): the architecture of a checkpoint without a
# description that differs from its registry entry (e.g. the digits model's
# 4x4 patches and 4 layers), and the compute dtype.
MODEL_KEYS = {
  'patch_size': int,
  'hidden_size': int,
  'num_layers': int,
  'num_heads': int,
  'mlp_dim': int,
  'classifier': str,
  'dtype': str,
}


def default_config(job: str) -> ml_collections.ConfigDict:
  """The keys every checkpoint-reading job has, with their defaults."""
  config = ml_collections.ConfigDict()
  config.job = job
  config.init = config_dict.placeholder(str)  # the checkpoint (required)
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


def names(value: str | tuple[str, ...] | None) -> list[str]:
  """A comma-separated string or tuple of strings as a list of names.

  `--config.key=a,b` sets a tuple field to ('a,b',), so items are split too.
  """
  if not value:
    return []
  if isinstance(value, str):
    value = (value,)
  split = (name.strip() for item in value for name in item.split(','))
  return [name for name in split if name]


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


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A checkpoint's model, ready to run.

  Attributes:
    model: the Flax module, with the checkpoint's head (if it has one).
    variables: its variables as host numpy arrays, fitted to `model` at
      `image_size`; `on_mesh` places them on the devices.
    description: the checkpoint's model description, or None.
    image_size: the resolution the jobs run at.
    config: the job config, with `image_size` resolved.
    mesh: the device mesh.
  """

  model: nn.Module
  variables: dict[str, PyTree]
  description: dict[str, Any] | None
  image_size: int
  config: ml_collections.ConfigDict
  mesh: Mesh

  @property
  def model_name(self) -> str:
    if self.description:
      return self.description['model_name']
    return self.config.model_name

  @property
  def has_class_token(self) -> bool:
    return getattr(self.model, 'classifier', None) in (
      'token',
      'token_unpooled',
    )

  def on_mesh(self) -> dict[str, PyTree]:
    """The variables on the mesh, sharded as `config.sharding` says."""
    shardings = sharding.tree_shardings(
      _abstract_variables(self.model, self.image_size, boxed=True),
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
      dataset_config(self.config, name, self.image_size), self.mesh
    )

  def require_head(self, job: str) -> int:
    """The number of classes; raises if the checkpoint has no head."""
    if not getattr(self.model, 'num_classes', None):
      raise ValueError(
        f'{self.config.init} has no classification head, which the {job} '
        'job needs (e.g. a masked-patch-prediction checkpoint); fine-tune '
        'it first (configs/finetune.py), or use the fewshot or inspect jobs.'
      )
    return self.model.num_classes


def _abstract_variables(model: nn.Module, image_size: int, boxed: bool):
  """Shapes of a model's params (and batch stats) at a resolution."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  # Attention modules also sow 'intermediates' at init; they are not state.
  variables = {
    k: v for k, v in variables.items() if k in ('params', 'batch_stats')
  }
  return variables if boxed else sharding.strip_boxes(variables)


def _posemb(params: dict[str, PyTree]) -> np.ndarray | None:
  try:
    return np.asarray(params['Transformer']['posembed_input']['pos_embedding'])
  except KeyError:
    return None


def _trained_size(model: nn.Module, params: dict[str, PyTree]) -> int | None:
  """The resolution of a square ViT's position embeddings, or None."""
  posemb = _posemb(params)
  if posemb is None or not isinstance(model, VisionTransformer):
    return None
  *_, stride = inspection.token_grid(model, 1, 1)
  tokens = posemb.shape[1] - int('cls' in params)
  side = math.isqrt(tokens)
  if side * side != tokens:
    return None
  return side * stride


def _fit(model, variables, image_size: int) -> dict[str, PyTree]:
  """The variables in the model's layout, position embeddings resized."""
  target = _abstract_variables(model, image_size, boxed=False)
  params = checkpoints.unflatten(checkpoints.flatten(variables['params']))
  for key in transfer.PRETRAINING_ONLY:
    params.pop(key, None)
  posemb = _posemb(params)
  if posemb is not None:
    wanted = target['params']['Transformer']['posembed_input']['pos_embedding']
    if posemb.shape != wanted.shape:
      prefix = int('cls' in params)
      side = math.isqrt(wanted.shape[1] - prefix)
      logging.info(
        'Resizing the position embeddings from %d to %d tokens for %d px.',
        posemb.shape[1],
        wanted.shape[1],
        image_size,
      )
      params['Transformer']['posembed_input']['pos_embedding'] = (
        transfer.resize_posemb(posemb, (side, side), prefix)
      )
  fitted = {'params': checkpoints.fit_to_model(params, target['params'])}
  if 'batch_stats' in target:
    fitted['batch_stats'] = checkpoints.fit_to_model(
      variables.get('batch_stats', {}), target['batch_stats']
    )
  return fitted


def load(config: ml_collections.ConfigDict) -> Checkpoint:
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
  variables, description = transfer.load_checkpoint(config.init, config.ema)
  overrides = models.config_overrides(config.model)
  model, trained_size = transfer.model_for_checkpoint(
    variables, description, config.model_name, **overrides
  )
  trained_size = trained_size or _trained_size(model, variables['params'])
  image_size = config.image_size or trained_size
  if not image_size:
    raise ValueError(
      f'The resolution of {config.init} is unknown (no description and no '
      'position embeddings); set --config.image_size.'
    )
  config = copy.deepcopy(config)
  config.image_size = image_size
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.model)
  return Checkpoint(
    model=model,
    variables=_fit(model, variables, image_size),
    description=description,
    image_size=image_size,
    config=config,
    mesh=mesh,
  )


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray | jax.Array):
    return _jsonable(np.asarray(value).tolist())
  if isinstance(value, np.generic):
    return value.item()
  return value


def write_json(workdir: str, name: str, value: Any) -> epath.Path:
  """Writes `value` (numpy arrays allowed) as workdir/name on process 0."""
  path = epath.Path(workdir) / name
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(value), indent=2) + '\n')
  return path


def write_text(workdir: str, name: str, text: str) -> epath.Path:
  """Writes text as workdir/name on process 0."""
  path = epath.Path(workdir) / name
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return path


def start(config: ml_collections.ConfigDict, workdir: str) -> Checkpoint:
  """Creates the workdir, records the config there and loads the checkpoint."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  loop.write_config(config, workdir)
  return load(config)

"""One loader for every checkpoint: source -> (model, variables, description).

A weight layout is a `Layout`: a name, what it expects (for the error when
nothing matches), a test of whether a path is one, and a reader returning
host variables and the model description if the file carries one. Adding a
layout is one module defining its `Layout` and one entry in `LAYOUTS`.
"""

import dataclasses
from typing import Any

import flax.linen as nn
from etils import epath

from vit_jax.checkpoints import (
  big_vision,
  hugging_face,
  infer,
  layout,
  npz,
  published,
  safetensors_file,
  timm,
  training,
  transfer,
)
from vit_jax.checkpoints.layout import Layout, ReadOptions
from vit_jax.models import registry, shapes
from vit_jax.models.description import ModelDescription

PyTree = Any


def _read_npz(path: epath.Path, options: ReadOptions):
  layout.single_weights(path, options)
  variables = npz.load_npz_variables(path)
  description_file = npz.description_path(path)
  if description_file.exists():
    return variables, ModelDescription.read(description_file)
  name, image_size = infer.name_from_file(path)
  name = options.model_name or name
  if not name:
    return variables, None
  return variables, infer.describe(
    variables['params'], model_name=name, source=path, image_size=image_size
  )


LAYOUTS: tuple[Layout, ...] = (
  Layout(
    name='orbax',
    expects='a workdir of this project (with checkpoints/) or a directory '
    'of numbered orbax steps',
    matches=lambda path: training.checkpoint_directory(path) is not None,
    read=lambda path, options: training.load_variables(path, ema=options.ema),
  ),
  big_vision.LAYOUT,
  Layout(
    name='npz',
    expects='a .npz archive in the published layout (original, AugReg, BiT '
    "or this project's export, with an optional <name>.json beside it)",
    matches=lambda path: path.is_file() and path.suffix == '.npz',
    read=_read_npz,
  ),
  timm.LAYOUT,
  hugging_face.LAYOUT,
)


class UnknownLayoutError(ValueError):
  """No registered layout reads a source."""


def local_path(
  source: str | epath.Path, weights_cache: str | None = None
) -> epath.Path:
  """The path of a source: itself, or the cached file of a published name."""
  if published.is_name(source):
    return published.resolve(str(source), weights_cache)
  path = epath.Path(source)
  if not path.exists():
    raise FileNotFoundError(f'No checkpoint at {source}.')
  return path


def read(
  source: str | epath.Path,
  ema: bool = False,
  *,
  model_name: str | None = None,
  weights_cache: str | None = None,
  **overrides,
) -> tuple[dict[str, PyTree], ModelDescription | None]:
  """The host variables of a checkpoint, and its description if it has one.

  Args:
    source: any path a registered layout reads, or a published name
      (`augreg:<file>`, `imagenet21k:<model>`; see `published`).
    ema: read the Polyak-averaged weights (orbax checkpoints).
    model_name: the registry name, for files that do not say it.
    weights_cache: where published files are cached.
    **overrides: attributes the caller sets, for files whose shapes do
      not show them (e.g. `num_heads` of a timm file without config.json).
  """
  path = local_path(source, weights_cache)
  safetensors_file.refuse_pickles(path)
  options = ReadOptions(ema=ema, model_name=model_name, overrides=overrides)
  for candidate in LAYOUTS:
    if candidate.matches(path):
      return candidate.read(path, options)
  tried = '\n'.join(f'  {known.name}: {known.expects}' for known in LAYOUTS)
  raise UnknownLayoutError(
    f'{source} is not a checkpoint of any known layout. Tried:\n{tried}'
  )


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A checkpoint ready to run.

  Attributes:
    model: the Flax module, with the checkpoint's head (if it has one).
    variables: host variables fitted to `model` at
      `description.image_size`.
    description: the model's description; `image_size` is the resolution
      the variables are fitted to.
  """

  model: nn.Module
  variables: dict[str, PyTree]
  description: ModelDescription


def _image_size(source, model, variables, description, wanted) -> int:
  """The resolution asked for, else trained at, else of the posemb grid."""
  image_size = (
    wanted
    or description.image_size
    or shapes.trained_image_size(model, variables['params'])
  )
  if not image_size:
    raise ValueError(
      f'The resolution of {source} is unknown (no description and no '
      'position embeddings); set --config.image_size.'
    )
  return image_size


def load(
  source: str | epath.Path,
  *,
  model_name: str | None = None,
  ema: bool = False,
  image_size: int | None = None,
  weights_cache: str | None = None,
  **overrides,
) -> Loaded:
  """Loads any checkpoint as its model, with its own head.

  Args:
    source: a workdir, orbax checkpoint directory or weights file.
    model_name: the registry name, for weights without a description (with
      one, it must agree).
    ema: read the Polyak-averaged weights (orbax checkpoints).
    image_size: run at this resolution (position embeddings resized);
      default: the resolution it was trained at.
    weights_cache: where published names are cached (`published`).
    **overrides: model attributes to set (e.g. dtype); with a description,
      the architecture must stay as it is.

  Raises:
    FileNotFoundError, UnknownLayoutError: the source is not a checkpoint.
    ValueError: the model is unknown or disagrees with `model_name`, or the
      resolution cannot be known.
    tree.CheckpointMismatchError: the parameters do not fit the model.
  """
  variables, description = read(
    source,
    ema,
    model_name=model_name,
    weights_cache=weights_cache,
    **overrides,
  )
  if description is None:
    raise ValueError(
      f'{source} has no model description and its name does not say the '
      'model: set --config.model_name (and any architecture overrides in '
      '--config.model).'
    )
  if model_name and registry.canonical_name(model_name) != (
    description.model_name
  ):
    raise ValueError(
      f'{source} holds {description.model_name}, not {model_name}.'
    )
  model = description.build(**overrides)
  image_size = _image_size(source, model, variables, description, image_size)
  target = shapes.abstract_variables(model, image_size)
  return Loaded(
    model=model,
    variables=transfer.transfer(variables, target, keep_head=True),
    description=description.replace(
      image_size=image_size,
      overrides={**description.overrides, **overrides},
    ),
  )

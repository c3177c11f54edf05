"""One loader for every checkpoint: source -> (model, variables, description).

A weight layout is a `Layout`: a name, what it expects (for the error when
nothing matches), a test of whether a path is one, and a reader returning
host variables and the model description if the file carries one. Adding a
layout is one module defining its `Layout` and one entry in `LAYOUTS`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from etils import epath

from vit_jax.checkpoints import npz, training, transfer
from vit_jax.models import shapes
from vit_jax.models.description import ModelDescription

PyTree = Any
Reader = Callable[
  [epath.Path, bool], tuple[dict[str, PyTree], ModelDescription | None]
]


@dataclasses.dataclass(frozen=True)
class Layout:
  """A kind of weights file or directory.

  Attributes:
    name: what users call it.
    expects: what a source of this layout looks like.
    matches: whether a path is of this layout.
    read: (path, ema) -> (host variables, description or None).
  """

  name: str
  expects: str
  matches: Callable[[epath.Path], bool]
  read: Reader


def _read_npz(path: epath.Path, ema: bool):
  if ema:
    raise ValueError(
      f'{path} holds one set of weights; --config.ema applies to orbax '
      'checkpoints (workdirs) only.'
    )
  description_file = npz.description_path(path)
  description = None
  if description_file.exists():
    description = ModelDescription.read(description_file)
  return npz.load_npz_variables(path), description


LAYOUTS: tuple[Layout, ...] = (
  Layout(
    name='orbax',
    expects='a workdir of this project (with checkpoints/) or a directory '
    'of numbered orbax steps',
    matches=lambda path: training.checkpoint_directory(path) is not None,
    read=lambda path, ema: training.load_variables(path, ema=ema),
  ),
  Layout(
    name='npz',
    expects='a .npz archive in the published layout (original, AugReg, BiT '
    "or this project's export, with an optional <name>.json beside it)",
    matches=lambda path: path.is_file() and path.suffix == '.npz',
    read=_read_npz,
  ),
)


class UnknownLayoutError(ValueError):
  """No registered layout reads a source."""


def read(
  source: str | epath.Path, ema: bool = False
) -> tuple[dict[str, PyTree], ModelDescription | None]:
  """The host variables of a checkpoint, and its description if it has one.

  Args:
    source: any path a registered layout reads.
    ema: read the Polyak-averaged weights (orbax checkpoints).
  """
  path = epath.Path(source)
  if not path.exists():
    raise FileNotFoundError(f'No checkpoint at {source}.')
  for layout in LAYOUTS:
    if layout.matches(path):
      return layout.read(path, ema)
  tried = '\n'.join(f'  {layout.name}: {layout.expects}' for layout in LAYOUTS)
  raise UnknownLayoutError(
    f'{source} is not a checkpoint of any known layout. Tried:\n{tried}'
  )


def describe(
  variables: dict[str, PyTree],
  model_name: str | None,
  **overrides,
) -> ModelDescription:
  """The description of weights that came without one, from their shapes.

  The registry name and architecture overrides come from the caller; the
  head's classes and the representation layer's size from the parameters.
  """
  if not model_name:
    raise ValueError(
      'This checkpoint has no model description: set --config.model_name '
      '(and any architecture overrides in --config.model).'
    )
  params = variables['params']
  head = params.get(transfer.HEAD)
  representation = params.get(transfer.REPRESENTATION)
  if representation is not None:
    overrides['representation_size'] = int(representation['kernel'].shape[-1])
  return ModelDescription(
    model_name=model_name,
    num_classes=int(head['kernel'].shape[-1]) if head else None,
    overrides=overrides,
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


def load(
  source: str | epath.Path,
  *,
  model_name: str | None = None,
  ema: bool = False,
  image_size: int | None = None,
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
    **overrides: model attributes to set (e.g. dtype); with a description,
      the architecture must stay as it is.

  Raises:
    FileNotFoundError, UnknownLayoutError: the source is not a checkpoint.
    ValueError: the model is unknown or disagrees with `model_name`, or the
      resolution cannot be known.
    tree.CheckpointMismatchError: the parameters do not fit the model.
  """
  variables, description = read(source, ema)
  if description is None:
    description = describe(variables, model_name, **overrides)
  elif model_name and model_name != description.model_name:
    raise ValueError(
      f'{source} holds {description.model_name}, not {model_name}.'
    )
  model = description.build(**overrides)
  image_size = image_size or description.image_size
  image_size = image_size or shapes.trained_image_size(
    model, variables['params']
  )
  if not image_size:
    raise ValueError(
      f'The resolution of {source} is unknown (no description and no '
      'position embeddings); set --config.image_size.'
    )
  target = shapes.abstract_variables(model, image_size)
  return Loaded(
    model=model,
    variables=transfer.transfer(variables, target, keep_head=True),
    description=description.replace(
      image_size=image_size,
      overrides={**description.overrides, **overrides},
    ),
  )

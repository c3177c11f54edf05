"""What a weight layout is: a name, what it expects, a test and a reader.

Every layout module defines one `Layout`; `loader.LAYOUTS` lists them in the
order they are tried.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from etils import epath

from vit_jax.models.description import ModelDescription

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ReadOptions:
  """What the caller knows about a checkpoint besides its content.

  Attributes:
    ema: read the Polyak-averaged weights (orbax checkpoints).
    model_name: the registry name, for files that do not say it.
    overrides: model attributes the caller sets (e.g. `num_heads` for a
      file whose shapes do not tell it).
  """

  ema: bool = False
  model_name: str | None = None
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


Reader = Callable[
  [epath.Path, ReadOptions],
  tuple[dict[str, PyTree], ModelDescription | None],
]


@dataclasses.dataclass(frozen=True)
class Layout:
  """A kind of weights file or directory.

  Attributes:
    name: what users call it.
    expects: what a source of this layout looks like.
    matches: whether a path is of this layout.
    read: (path, options) -> (host variables, description or None).
  """

  name: str
  expects: str
  matches: Callable[[epath.Path], bool]
  read: Reader


def single_weights(path: epath.Path, options: ReadOptions) -> None:
  """Raises for --config.ema on a file that holds one set of weights."""
  if options.ema:
    raise ValueError(
      f'{path} holds one set of weights; --config.ema applies to orbax '
      'checkpoints (workdirs) only.'
    )

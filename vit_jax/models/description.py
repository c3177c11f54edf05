"""A model's description: what rebuilds it from the registry.

Training writes it beside every checkpoint (in the orbax step and as
`model.json` next to an exported `model.npz`); every loader reads it. It
names a registry model, the attributes changed from the registry's, the
number of classes, the resolution trained at and, optionally, the class
names, so that a checkpoint is usable without the config that made it.
The JSON is a flat object of these fields; files written before
`class_names` existed read as None.
"""

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
from etils import epath

from vit_jax import workdir
from vit_jax.models import registry

# Model attributes that belong to a training run rather than to the
# architecture: a new run on a checkpoint sets its own.
TRAINING_ATTRIBUTES = (
  'dropout_rate',
  'attention_dropout_rate',
  'head_bias_init',
  'representation_size',
  'dtype',
  'scan',
  'remat_policy',
)


class DescriptionError(ValueError):
  """A model description file is missing fields or is not JSON."""


@dataclasses.dataclass(frozen=True)
class ModelDescription:
  """A registry model plus what differs from it.

  Attributes:
    model_name: the registry name (`vit_jax.models.list_models()`).
    num_classes: the head's size; None for a model without a head.
    image_size: the resolution it was trained at, if known.
    overrides: module attributes set on top of the registry's.
    class_names: the label of each output, if known.
    objective: the pretraining objective when it is not supervised
      ('masked_patch_prediction'), whose model adds parameters to the
      registry's.
    mpp: that objective's settings.
  """

  model_name: str
  num_classes: int | None
  image_size: int | None = None
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  class_names: Sequence[str] | None = None
  objective: str | None = None
  mpp: Mapping[str, Any] | None = None

  def build(self, **overrides) -> nn.Module:
    """The Flax module; `overrides` change attributes on top of these."""
    return registry.get_model(
      self.model_name, self.num_classes, **{**self.overrides, **overrides}
    )

  def architecture(self) -> dict[str, Any]:
    """The overrides that shape the parameters (not a run's settings)."""
    return {
      key: value
      for key, value in self.overrides.items()
      if key not in TRAINING_ATTRIBUTES
    }

  def replace(self, **changes) -> 'ModelDescription':
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict[str, Any]:
    value = {
      'model_name': self.model_name,
      'num_classes': self.num_classes,
      'image_size': self.image_size,
      'overrides': dict(self.overrides),
    }
    if self.class_names is not None:
      value['class_names'] = list(self.class_names)
    if self.objective is not None:
      value['objective'] = self.objective
      value['mpp'] = dict(self.mpp or {})
    return value

  @classmethod
  def from_json(
    cls, value: Mapping[str, Any], source: str = 'the description'
  ) -> 'ModelDescription':
    if not isinstance(value, Mapping) or 'model_name' not in value:
      raise DescriptionError(
        f'{source} is not a model description: it needs a JSON object with '
        "at least 'model_name' (and 'num_classes', 'image_size', "
        "'overrides')."
      )
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise DescriptionError(f'{source} has unknown fields {unknown}.')
    class_names = value.get('class_names')
    return cls(
      model_name=value['model_name'],
      num_classes=value.get('num_classes'),
      image_size=value.get('image_size'),
      overrides=dict(value.get('overrides') or {}),
      class_names=None if class_names is None else tuple(class_names),
      objective=value.get('objective'),
      mpp=value.get('mpp'),
    )

  @classmethod
  def read(cls, path: str | os.PathLike) -> 'ModelDescription':
    path = epath.Path(path)
    try:
      value = json.loads(path.read_text())
    except ValueError as e:  # Not JSON, or not even text.
      raise DescriptionError(
        f'{path} is not valid JSON ({type(e).__name__}: {e}); delete it and '
        'pass --config.model_name, or re-export the checkpoint.'
      ) from e
    return cls.from_json(value, source=str(path))

  def write(self, path: str | os.PathLike) -> None:
    """Writes beside `path` and renames: a kill never leaves half a file."""
    text = json.dumps(self.to_json(), indent=2)
    workdir.replace_atomically(
      epath.Path(path), lambda tmp: tmp.write_text(text)
    )

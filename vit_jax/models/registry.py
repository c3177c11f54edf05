"""The model zoo: names -> architecture hyperparameters.

Every row of the paper's results table is here, plus the later ViT sizes
(Ti, S, B/8) and the conv-stem ViTc models. `get_model` builds the Flax
module; `model_spec` returns the hyperparameters (for FLOP counts, configs and
checkpoint checks).
"""

import dataclasses
import difflib
from typing import Any

import flax.linen as nn

from vit_jax.models import resnet, vit

# Table 1 of the paper, plus Ti and S from the AugReg release.
VIT_SIZES = {
  'Ti': dict(hidden_size=192, mlp_dim=768, num_heads=3, num_layers=12),
  'S': dict(hidden_size=384, mlp_dim=1536, num_heads=6, num_layers=12),
  'B': dict(hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12),
  'L': dict(hidden_size=1024, mlp_dim=4096, num_heads=16, num_layers=24),
  'H': dict(hidden_size=1280, mlp_dim=5120, num_heads=16, num_layers=32),
}

# Dropout of the released model configs (used by fine-tuning); the
# pretraining configs set their own (Table 3).
_RELEASED_DROPOUT = {'ViT-L_16': 0.1, 'ViT-H_14': 0.1, 'R50+ViT-B_16': 0.1}

BIT_DEPTHS = {
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
  200: (3, 24, 36, 3),
}

# "Early Convolutions Help Transformers See Better": (features, stride) of
# each 3x3 conv; a 1x1 conv to D follows and the encoder has one block fewer.
VITC_MODELS = {
  # ViTC-1GF
  'ViTc-Ti_16': dict(
    conv_stem=((24, 2), (48, 2), (96, 2), (192, 2)),
    hidden_size=192,
    mlp_dim=576,
    num_heads=3,
    num_layers=11,
  ),
  # ViTC-4GF
  'ViTc-S_16': dict(
    conv_stem=((48, 2), (96, 2), (192, 2), (384, 2)),
    hidden_size=384,
    mlp_dim=1152,
    num_heads=6,
    num_layers=11,
  ),
  # ViTC-18GF
  'ViTc-B_16': dict(
    conv_stem=((64, 2), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)),
    hidden_size=768,
    mlp_dim=3072,
    num_heads=12,
    num_layers=11,
  ),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered model: its family and the module's keyword arguments."""

  name: str
  family: str  # 'vit', 'hybrid', 'vitc' or 'bit'
  kwargs: dict[str, Any]

  @property
  def module_class(self) -> type[nn.Module]:
    return resnet.BiTResNet if self.family == 'bit' else vit.VisionTransformer


def _build_registry() -> dict[str, ModelSpec]:
  specs = {}

  def add(name, family, **kwargs):
    specs[name] = ModelSpec(name, family, kwargs)

  for size, patch in [
    ('Ti', 16),
    ('S', 16),
    ('S', 32),
    ('B', 32),
    ('B', 16),
    ('B', 8),
    ('L', 32),
    ('L', 16),
    ('H', 14),
  ]:
    name = f'ViT-{size}_{patch}'
    add(
      name,
      'vit',
      patch_size=patch,
      dropout_rate=_RELEASED_DROPOUT.get(name, 0.0),
      **VIT_SIZES[size],
    )
  for size, stride, stages in [
    ('B', 32, (3, 4, 6, 3)),
    ('B', 16, (3, 4, 9)),
    ('L', 32, (3, 4, 6, 3)),
    ('L', 16, (3, 4, 9)),
  ]:
    name = f'R50+ViT-{size}_{stride}'
    add(
      name,
      'hybrid',
      patch_size=1,
      resnet_stages=stages,
      resnet_width=1.0,
      dropout_rate=_RELEASED_DROPOUT.get(name, 0.0),
      **VIT_SIZES[size],
    )
  for depth, width in [
    (50, 1),
    (50, 2),
    (101, 1),
    (152, 1),
    (152, 2),
    (200, 3),
  ]:
    add(
      f'BiT-R{depth}x{width}',
      'bit',
      stage_sizes=BIT_DEPTHS[depth],
      width_factor=width,
    )
  for name, kwargs in VITC_MODELS.items():
    add(name, 'vitc', patch_size=1, **kwargs)
  return specs


_REGISTRY = _build_registry()


def list_models() -> list[str]:
  """Names of every registered model."""
  return list(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
  """The registered spec of `name`; unknown names list the close matches."""
  try:
    return _REGISTRY[name]
  except KeyError:
    close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.4)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise KeyError(
      f'Unknown model {name!r}.{hint} list_models() gives all '
      f'{len(_REGISTRY)} names.'
    ) from None


def config_overrides(model_config) -> dict[str, Any]:
  """The attributes a config's `model` block sets (its None entries left out).

  Args:
    model_config: `config.model` of a job config (a ConfigDict or a dict).
  """
  return {
    key: value for key, value in model_config.items() if value is not None
  }


def get_model(name: str, num_classes: int | None = 1000, **overrides):
  """Builds the Flax module of a registered model.

  Args:
    name: a name from `list_models()`, e.g. 'ViT-B_16' or 'BiT-R50x1'.
    num_classes: size of the head; None or 0 for a feature extractor.
    **overrides: module attributes to change (e.g. `dtype='bfloat16'`,
      `scan=True`, `hidden_size=32` for a tiny test model).

  Returns:
    A `VisionTransformer` or `BiTResNet`; `module.apply(variables, images,
    train=False)` maps NHWC images in [-1, 1] to float32 logits.
  """
  spec = model_spec(name)
  cls = spec.module_class
  fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(
      f'{cls.__name__} ({name}) has no attribute(s) {unknown}; it takes '
      f'{sorted(fields)}.'
    )
  kwargs = {**spec.kwargs, **overrides}
  return cls(num_classes=num_classes, **kwargs)

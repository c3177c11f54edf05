"""The model zoo: names -> architecture hyperparameters.

Every row of the paper's results table is here, plus the later ViT sizes
(Ti, S, B/8), the AugReg hybrids (R26+ViT, R+ViT-Ti) and the conv-stem ViTc
models. `get_model` builds the Flax module; `model_spec` returns the
hyperparameters (for FLOP counts, configs and checkpoint checks). Besides
its own names, `model_spec` accepts the AugReg file prefixes ('B_16',
'R26_S_32') and timm's model names ('vit_base_patch16_224', optionally with
a '.tag'); see `ALIASES`.
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

# The ResNet+ViT hybrids: (ViT size, name's stride, ResNet stages, patch
# size). The ResNet's root has stride 4 and each stage after the first 2, so
# the patch grid is image / (4 * 2**(stages - 1) * patch): /16 for (3, 4, 9),
# /32 for four stages, and /32 for the root alone with 8x8 patches. The
# AugReg R+ViT-Ti_16 config calls that model "/16", but its root is stride 4
# (7x7 tokens at 224, as its checkpoints' position embeddings have).
HYBRIDS = {
  'R50+ViT-B_32': ('B', (3, 4, 6, 3), 1),
  'R50+ViT-B_16': ('B', (3, 4, 9), 1),
  'R50+ViT-L_32': ('L', (3, 4, 6, 3), 1),
  'R50+ViT-L_16': ('L', (3, 4, 9), 1),
  'R26+ViT-S_32': ('S', (2, 2, 2, 2), 1),
  'R26+ViT-B_32': ('B', (2, 2, 2, 2), 1),
  'R+ViT-Ti_16': ('Ti', (), 8),
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
  for name, (size, stages, patch) in HYBRIDS.items():
    add(
      name,
      'hybrid',
      patch_size=patch,
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

# timm's names of the registered models (the resolution in a timm name is
# that of its weights, not an attribute of the model).
_TIMM_NAMES = {
  'ViT-Ti_16': ('vit_tiny_patch16_224', 'vit_tiny_patch16_384'),
  'ViT-S_16': ('vit_small_patch16_224', 'vit_small_patch16_384'),
  'ViT-S_32': ('vit_small_patch32_224', 'vit_small_patch32_384'),
  'ViT-B_32': ('vit_base_patch32_224', 'vit_base_patch32_384'),
  'ViT-B_16': ('vit_base_patch16_224', 'vit_base_patch16_384'),
  'ViT-B_8': ('vit_base_patch8_224',),
  'ViT-L_32': ('vit_large_patch32_224', 'vit_large_patch32_384'),
  'ViT-L_16': ('vit_large_patch16_224', 'vit_large_patch16_384'),
  'ViT-H_14': ('vit_huge_patch14_224',),
  'R+ViT-Ti_16': ('vit_tiny_r_s16_p8_224', 'vit_tiny_r_s16_p8_384'),
  'R26+ViT-S_32': ('vit_small_r26_s32_224', 'vit_small_r26_s32_384'),
  'R26+ViT-B_32': ('vit_base_r26_s32_224',),
  'R50+ViT-B_16': ('vit_base_r50_s16_224', 'vit_base_r50_s16_384'),
  'R50+ViT-L_32': ('vit_large_r50_s32_224', 'vit_large_r50_s32_384'),
  'BiT-R50x1': ('resnetv2_50x1_bit',),
  'BiT-R101x1': ('resnetv2_101x1_bit',),
  'BiT-R152x2': ('resnetv2_152x2_bit',),
}


def _build_aliases() -> dict[str, str]:
  """Other names -> registry names: AugReg file prefixes and timm names.

  An AugReg prefix is the ViT or hybrid's name without 'ViT-' and with '+'
  turned into '_' (the rule of the AugReg release's `AUGREG_CONFIGS`).
  """
  aliases = {}
  for name, spec in _REGISTRY.items():
    if spec.family in ('vit', 'hybrid'):
      aliases[name.replace('ViT-', '').replace('+', '_')] = name
  for name, timm_names in _TIMM_NAMES.items():
    aliases.update(dict.fromkeys(timm_names, name))
  return aliases


ALIASES = _build_aliases()


def timm_names(name: str) -> tuple[str, ...]:
  """timm's names of a registered model (empty if timm has none)."""
  return _TIMM_NAMES.get(canonical_name(name), ())


def list_models() -> list[str]:
  """Names of every registered model (aliases left out)."""
  return list(_REGISTRY)


def canonical_name(name: str) -> str:
  """The registry name of a registry name or alias.

  A timm name may carry its weights' tag ('vit_base_patch16_224.augreg_in21k');
  the tag is dropped. Unknown names raise a KeyError that lists the close
  matches.
  """
  if name in _REGISTRY:
    return name
  if name in ALIASES:
    return ALIASES[name]
  timm_name, dot, _ = name.partition('.')
  if dot and timm_name in ALIASES:
    return ALIASES[timm_name]
  known = [*_REGISTRY, *ALIASES]
  close = difflib.get_close_matches(name, known, n=5, cutoff=0.4)
  hint = f' Did you mean {", ".join(close)}?' if close else ''
  raise KeyError(
    f'Unknown model {name!r}.{hint} list_models() gives all '
    f'{len(_REGISTRY)} names; registry.ALIASES the other {len(ALIASES)} '
    'accepted (AugReg and timm names).'
  )


def model_spec(name: str) -> ModelSpec:
  """The registered spec of a name or alias (its `name` is the registry's)."""
  return _REGISTRY[canonical_name(name)]


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
    name: a name from `list_models()`, e.g. 'ViT-B_16' or 'BiT-R50x1', or
      an alias ('B_16', 'vit_base_patch16_224'; see `ALIASES`).
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

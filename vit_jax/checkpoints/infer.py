"""The model of weights that came without a description.

A parameter tree of this project's layout shows most of its architecture in
its shapes (width, depth, MLP width, heads, patch size, the hybrid's ResNet
stages, the pooling and position embedding); the registry name comes from
the caller, from the file's name (AugReg, the original buckets' and timm's
names) or from the registry model with exactly that architecture.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from etils import epath

from vit_jax.models import registry
from vit_jax.models.description import ModelDescription

PyTree = Any

# What the shapes tell, compared with a registry model to choose one.
_SHAPE_ATTRIBUTES = (
  'hidden_size',
  'num_layers',
  'mlp_dim',
  'num_heads',
  'patch_size',
  'resnet_stages',
  'resnet_width',
  'stage_sizes',
  'width_factor',
)
_RESOLUTION = re.compile(r'(?:res_|[_-])(\d{3})$')


def _units(params: Mapping[str, Any], prefix: str) -> tuple[int, ...]:
  """Units per stage of ResNet stages named `{prefix}{s}/unit...`."""
  stages = []
  while f'{prefix}{len(stages) + 1}' in params:
    stages.append(len(params[f'{prefix}{len(stages) + 1}']))
  return tuple(stages)


def _vit_architecture(params: Mapping[str, Any]) -> dict[str, Any]:
  embedding = params['embedding']['kernel']
  encoder = params['Transformer']
  blocks = [key for key in encoder if key.startswith('encoderblock_')]
  block = encoder['encoderblock_0']
  attention = next(v for k, v in block.items() if k.startswith('MultiHead'))
  mlp = next(v for k, v in block.items() if k.startswith('MlpBlock'))
  found = dict(
    patch_size=int(embedding.shape[0]),
    hidden_size=int(embedding.shape[-1]),
    num_layers=len(blocks),
    mlp_dim=int(mlp['Dense_0']['kernel'].shape[-1]),
    num_heads=int(attention['query']['kernel'].shape[1]),
    posemb='learn' if 'posembed_input' in encoder else 'sincos2d',
  )
  if 'MAPHead_0' in params:
    found['classifier'] = 'map'
  else:
    found['classifier'] = 'token' if 'cls' in params else 'gap'
  if 'pre_logits' in params:
    found['representation_size'] = int(params['pre_logits']['kernel'].shape[-1])
  if 'conv_root' in params:
    found['resnet_stages'] = _units(params, 'block')
    found['resnet_width'] = params['conv_root']['kernel'].shape[-1] / 64
  return found


def architecture(params: Mapping[str, Any]) -> dict[str, Any]:
  """Module attributes that a parameter tree (unrolled blocks) shows.

  Raises:
    ValueError: the tree is neither a ViT, a hybrid nor a BiT ResNet.
  """
  if 'root_block' in params:
    width = params['root_block']['standardized_conv2d']['kernel'].shape[-1]
    return dict(stage_sizes=_units(params, 'block'), width_factor=width // 64)
  if 'embedding' in params and 'encoderblock_0' in params.get(
    'Transformer', {}
  ):
    return _vit_architecture(params)
  raise ValueError(
    'The parameters are not of a ViT, hybrid or BiT ResNet (no '
    "'embedding' and 'Transformer/encoderblock_0', nor 'root_block')."
  )


def _module_defaults(spec: registry.ModelSpec) -> dict[str, Any]:
  fields = dataclasses.fields(spec.module_class)
  defaults = {
    f.name: f.default for f in fields if f.default is not dataclasses.MISSING
  }
  return {**defaults, **spec.kwargs}


def _normalize(value):
  return tuple(value) if isinstance(value, list) else value


def matching_model(found: Mapping[str, Any]) -> str | None:
  """The registry model whose shapes are exactly `found`'s, if one is."""
  for name in registry.list_models():
    spec = registry.model_spec(name)
    defaults = _module_defaults(spec)
    shown = [key for key in _SHAPE_ATTRIBUTES if key in found]
    if all(
      key in defaults and _normalize(defaults[key]) == _normalize(found[key])
      for key in shown
    ) and all(key in found for key in _SHAPE_ATTRIBUTES if key in spec.kwargs):
      return name
  return None


def name_from_file(path: str | epath.Path) -> tuple[str | None, int | None]:
  """(registry name, resolution) read from a weights file's name.

  Understands the AugReg names (`B_16-i21k-300ep-...`, fine-tuned ones
  ending in `res_384`), the original buckets' (`ViT-B_16.npz`,
  `ViT-L_16-224.npz`) and timm's (`vit_base_patch16_384.augreg_in21k`).
  """
  stem = epath.Path(path).name
  for suffix in ('.npz', '.safetensors'):
    stem = stem.removesuffix(suffix)
  # timm names end with a '.tag'; AugReg names have dots in their numbers.
  match = _RESOLUTION.search(stem) or _RESOLUTION.search(stem.partition('.')[0])
  resolution = int(match.group(1)) if match else None
  candidates = (
    stem,
    _RESOLUTION.sub('', stem),
    stem.split('-')[0],  # AugReg: the model before the first '-'.
  )
  for candidate in candidates:
    try:
      return registry.canonical_name(candidate), resolution
    except KeyError:
      continue
  return None, resolution


def describe(
  params: PyTree,
  *,
  model_name: str | None,
  source: str | epath.Path,
  image_size: int | None = None,
  **known,
) -> ModelDescription:
  """The description of parameters from their shapes and a model name.

  Args:
    params: the parameter tree in this project's layout.
    model_name: the registry name (or alias) if the caller or the file
      says it; otherwise the registry model with the same shapes.
    source: the file, for error messages.
    image_size: the resolution, if the file says it.
    **known: attributes the layout fixes (e.g. `gelu_approximate=False`).

  Returns:
    The named model with, as overrides, every attribute where the weights
    differ from the registry's.
  """
  found = architecture(params)
  if model_name is None:
    model_name = matching_model(found)
  if model_name is None:
    shown = ', '.join(f'{k}={v}' for k, v in found.items())
    raise ValueError(
      f'{source}: no registered model has this architecture ({shown}) and '
      'the file does not name one; set --config.model_name (a registry '
      'model to start from; the shapes override its attributes).'
    )
  spec = registry.model_spec(model_name)
  defaults = _module_defaults(spec)
  overrides = {
    key: value
    for key, value in {**found, **known}.items()
    if _normalize(defaults.get(key)) != _normalize(value)
  }
  head = params.get('head')
  return ModelDescription(
    model_name=spec.name,
    num_classes=int(head['kernel'].shape[-1]) if head else None,
    image_size=image_size,
    overrides=overrides,
  )

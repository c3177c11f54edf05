"""timm's safetensors layout (the Hugging Face hub's `timm/...` models).

Reads `vit_*` ViTs (token, 'avg' pooling with `fc_norm=False`, 'map'), the
`vit_*_r*` ResNet hybrids and the `resnetv2_*_bit` BiT ResNets from a
`.safetensors` file or a hub snapshot directory (`model.safetensors` +
`config.json`), and writes them back with a `config.json` that timm reads.

The model: timm's `architecture` in config.json names it (its
`model_args` and `pretrained_cfg.input_size` refine it); without
config.json, `model_name` or the file's name does. timm's ViTs use exact
GELU, so the description sets `gelu_approximate=False`. Numerics that
differ and are kept as this project's models compute them: timm's hybrids
standardise their convs with sqrt(var + 1e-8) and use GroupNorm eps 1e-5,
the original hybrids (this project's) (std + 1e-5) and 1e-6: a relative
difference of about 1e-4 in the logits. BiT is the same in both.
"""

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from vit_jax.checkpoints import (
  infer,
  key_maps,
  layout,
  npz,
  safetensors_file,
  timm_rules,
  tree,
)
from vit_jax.models import registry, shapes
from vit_jax.models.description import ModelDescription
from vit_jax.models.encoder import posemb_sincos_2d

NAME = 'timm'
_BIT_STEM = 'stem.conv.weight'
# timm's `VisionTransformer` arguments for this project's attributes.
_MODEL_ARGS = {
  'hidden_size': 'embed_dim',
  'num_layers': 'depth',
  'num_heads': 'num_heads',
  'patch_size': 'patch_size',
}


def _is_timm_keys(keys) -> bool:
  keys = set(keys)
  return 'patch_embed.proj.weight' in keys or _BIT_STEM in keys


def matches(path: epath.Path) -> bool:
  weights = safetensors_file.weights_file(path)
  return weights is not None and _is_timm_keys(safetensors_file.keys(weights))


def _timm_config(path: epath.Path) -> dict[str, Any]:
  config = safetensors_file.config(path) or {}
  return config if 'architecture' in config else {}


def _model_name(path, config, options) -> tuple[str | None, int | None]:
  """The registry name and resolution, from config.json, caller or name."""
  input_size = config.get('pretrained_cfg', {}).get('input_size')
  resolution = int(input_size[-1]) if input_size else None
  if config:
    try:
      return registry.canonical_name(config['architecture']), resolution
    except KeyError as e:
      raise ValueError(
        f'{path}: timm architecture {config["architecture"]!r} is not a '
        f'model of this project ({e}); pass --config.model_name for one '
        'with the same shapes.'
      ) from e
  if options.model_name:
    return options.model_name, None
  name, from_file = infer.name_from_file(path)
  return name, from_file


def _num_heads(flat, name, config, options, path) -> int:
  """timm's fused q-k-v weight does not show the heads: they come from the
  model's arguments, the caller or the registry model of the same width."""
  for source in (config.get('model_args', {}), options.overrides):
    if source.get('num_heads'):
      return int(source['num_heads'])
  width = flat['patch_embed.proj.weight'].shape[0]
  if name:
    spec = registry.model_spec(name)
    if spec.kwargs.get('hidden_size') == width:
      return spec.kwargs['num_heads']
  raise ValueError(
    f'{path}: the number of attention heads of this width-{width} ViT is '
    'unknown (no config.json naming a timm architecture); set '
    '--config.model_name and, if its width differs, --config.model.num_heads.'
  )


def _cls_posemb_row(flat: dict[str, np.ndarray]) -> None:
  """timm's `no_embed_class` keeps no position-embedding row for the class
  token (added after the embedding); a zero row is the same function."""
  posemb = flat.get('pos_embed')
  if posemb is None or 'cls_token' not in flat:
    return
  tokens = posemb.shape[1]
  if math.isqrt(tokens) ** 2 == tokens:
    flat['pos_embed'] = np.concatenate(
      [np.zeros_like(posemb[:, :1]), posemb], axis=1
    )


def _root_only(model) -> bool:
  stages = getattr(model, 'resnet_stages', None)
  return stages is not None and not len(stages)


def _check_against_model(weights, file_shapes, description, params):
  """Lists a mismatch with the described model in timm's own names."""
  model = description.build()
  image_size = description.image_size or shapes.trained_image_size(
    model, params
  )
  if not image_size:
    return  # BiT: `transfer` checks it (no resolution-dependent shapes).
  family = registry.model_spec(description.model_name).family
  expected = key_maps.expected_shapes(
    model, image_size, timm_rules.for_model(family, _root_only(model)), NAME
  )
  key_maps.check_shapes(
    file_shapes,
    expected,
    f"{weights} does not fit {description.model_name} in timm's layout",
  )


def read(path: epath.Path, options: layout.ReadOptions):
  """(variables, description) of a timm file or snapshot."""
  layout.single_weights(path, options)
  weights = safetensors_file.weights_file(path)
  config = _timm_config(path)
  model_args = config.get('model_args', {})
  flat = safetensors_file.read(weights)
  name, image_size = _model_name(path, config, options)
  if _BIT_STEM in flat:
    table, heads, known = timm_rules.BIT, None, {}
  else:
    table = timm_rules.VIT_OR_HYBRID
    heads = _num_heads(flat, name, config, options, path)
    # timm's ViTs use exact GELU unless their arguments say otherwise.
    known = {'gelu_approximate': model_args.get('act_layer') == 'gelu_tanh'}
    _cls_posemb_row(flat)
  params = tree.unflatten(key_maps.to_ours(flat, table, heads, NAME))
  description_file = npz.description_path(weights)
  if description_file.exists():
    description = ModelDescription.read(description_file)
  else:
    description = infer.describe(
      params,
      model_name=name,
      source=path,
      image_size=model_args.get('img_size') or image_size,
      **known,
    )
    # The position embeddings tell the resolution of the weights; a timm
    # name's is its architecture's default.
    trained = shapes.trained_image_size(description.build(), params)
    description = description.replace(
      image_size=trained or description.image_size
    )
  _check_against_model(
    weights, {k: v.shape for k, v in flat.items()}, description, params
  )
  return {'params': params}, description


LAYOUT = layout.Layout(
  name=NAME,
  expects="a timm .safetensors (keys 'patch_embed.proj.weight', "
  "'blocks.{i}.attn.qkv.weight', ... or BiT's 'stem.conv.weight'), or a hub "
  'snapshot directory with model.safetensors and a config.json naming the '
  'architecture',
  matches=matches,
  read=read,
)


# ----------------------------------------------------------------------------
# Writing.


def _timm_name(description: ModelDescription, image_size: int) -> str:
  names = registry.timm_names(description.model_name)
  if not names:
    raise ValueError(
      f'{description.model_name} has no timm counterpart; timm has '
      'ViT-{Ti,S,B,L,H}, the R26/R50 hybrids, R+ViT-Ti_16 and BiT-R50x1, '
      'R101x1, R152x2. Save it as npz instead.'
    )
  return next((n for n in names if n.endswith(f'_{image_size}')), names[0])


def _model_args(model, spec, image_size: int, timm_name: str) -> dict:
  """timm `create_model` arguments for what differs from timm's model."""
  if spec.family == 'bit':
    return {}
  args = {
    arg: getattr(model, attr)
    for attr, arg in _MODEL_ARGS.items()
    if getattr(model, attr) != spec.kwargs[attr]
  }
  if model.mlp_dim != 4 * model.hidden_size:
    args['mlp_ratio'] = model.mlp_dim / model.hidden_size
  if model.classifier == 'gap':
    args.update(class_token=False, global_pool='avg', fc_norm=False)
  elif model.classifier == 'map':
    args.update(class_token=False, global_pool='map')
  if model.gelu_approximate:
    args['act_layer'] = 'gelu_tanh'
  if not timm_name.endswith(f'_{image_size}'):
    args['img_size'] = image_size
  return args


def _check_writable(model, spec, flat) -> None:
  problems = []
  if spec.family == 'bit':
    if (model.stage_sizes, model.width_factor) != (
      spec.kwargs['stage_sizes'],
      spec.kwargs['width_factor'],
    ):
      problems.append('a BiT architecture other than the registry model')
  else:
    if 'pre_logits/kernel' in flat:
      problems.append('a representation layer (pre_logits)')
    if model.classifier not in ('token', 'gap', 'map'):
      problems.append(f'classifier={model.classifier!r}')
    if model.conv_stem is not None:
      problems.append('a convolutional stem (ViTc)')
    stages = model.resnet_stages
    if spec.family == 'hybrid' and (tuple(stages), model.resnet_width) != (
      tuple(spec.kwargs['resnet_stages']),
      spec.kwargs['resnet_width'],
    ):
      problems.append('ResNet stages other than the registry model')
  if problems:
    raise ValueError(
      f'timm has no place for {", ".join(problems)}; save it as npz.'
    )


def hub_config(
  description: ModelDescription, model, image_size: int
) -> dict[str, Any]:
  """The config.json of a timm hub snapshot for a model of this project."""
  spec = registry.model_spec(description.model_name)
  timm_name = _timm_name(description, image_size)
  bit = spec.family == 'bit'
  num_classes = description.num_classes or 0
  config = {
    'architecture': timm_name,
    'num_classes': num_classes,
    'num_features': 2048 * model.width_factor if bit else model.hidden_size,
    'global_pool': 'avg'
    if bit
    else {'token': 'token', 'gap': 'avg', 'map': 'map'}[model.classifier],
    'pretrained_cfg': {
      'input_size': [3, image_size, image_size],
      'fixed_input_size': not bit,
      'interpolation': 'bicubic',
      'crop_pct': 1.0,
      'crop_mode': 'center',
      # This project's models read images scaled to [-1, 1].
      'mean': [0.5, 0.5, 0.5],
      'std': [0.5, 0.5, 0.5],
      'num_classes': num_classes,
      'pool_size': None,
      'first_conv': 'stem.conv' if bit else 'patch_embed.proj',
      'classifier': 'head.fc' if bit else 'head',
    },
  }
  args = _model_args(model, spec, image_size, timm_name)
  if args:
    config['model_args'] = args
  if description.class_names:
    config['label_names'] = list(description.class_names)
  return config


def _fixed_posemb_as_learned(model, flat, image_size) -> None:
  """timm has no fixed 2-D sin-cos embedding: its values are written as the
  learned one (a zero row for the class token, which gets none)."""
  rows, cols, _ = shapes.token_grid(model, image_size, image_size)
  posemb = np.asarray(posemb_sincos_2d(rows, cols, model.hidden_size))
  if model.classifier == 'token':
    posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
  flat['Transformer/posembed_input/pos_embedding'] = posemb


def save(
  path: str | epath.Path,
  variables: Mapping[str, Any],
  description: ModelDescription,
) -> epath.Path:
  """Writes a model as timm's model.safetensors with config.json beside it.

  `timm.create_model(config['architecture'], pretrained=True,
  pretrained_cfg_overlay=dict(file=path), **config.get('model_args', {}))`
  then computes this model (to float32 rounding; the hybrids as the module
  docstring says). This project's `<name>.json` description goes beside it.

  Raises:
    ValueError: the model has parts timm's models do not have, or
      config.json beside `path` is not a timm config.
  """
  path = epath.Path(path)
  if 'batch_stats' in variables:
    raise ValueError('timm has no place for BatchNorm statistics (ViTc).')
  config_file = path.parent / safetensors_file.CONFIG
  if config_file.exists() and not _timm_config(path.parent):
    raise ValueError(
      f'{config_file} exists and is not a timm config; save the '
      '.safetensors in a directory of its own.'
    )
  model = description.build()
  spec = registry.model_spec(description.model_name)
  flat = tree.unstack_blocks(
    tree.global_block_numbering(tree.flatten(variables['params']))
  )
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  image_size = description.image_size or shapes.trained_image_size(
    model, variables['params']
  )
  if not image_size:
    raise ValueError('Set the description image_size to save in timm layout.')
  _check_writable(model, spec, flat)
  if spec.family != 'bit' and model.posemb == 'sincos2d':
    _fixed_posemb_as_learned(model, flat, image_size)
    description = description.replace(
      overrides={**description.overrides, 'posemb': 'learn'}
    )
  table = timm_rules.for_model(spec.family, _root_only(model))
  safetensors_file.write(
    path, key_maps.to_theirs(flat, table, NAME), {'format': 'pt'}
  )
  description = description.replace(image_size=image_size)
  config = hub_config(description, model, image_size)
  config_file.write_text(json.dumps(config, indent=2))
  description.write(npz.description_path(path))
  return path

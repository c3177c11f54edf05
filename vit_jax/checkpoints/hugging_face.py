"""Hugging Face transformers' ViT (`ViTForImageClassification`, `ViTModel`).

A `model.safetensors` with the transformers `config.json` beside it (a hub
snapshot such as google/vit-base-patch16-224). The config gives what the
shapes do not: the heads, the activation (`hidden_act='gelu'` is exact
GELU) and the LayerNorm epsilon (1e-12 by default). `ViTModel`'s pooler
(Linear + tanh on the class token) is this project's representation layer.
"""

from typing import Any

from etils import epath

from vit_jax.checkpoints import infer, key_maps, layout, safetensors_file, tree
from vit_jax.checkpoints.key_maps import (
  CONV,
  HEADS_BIAS,
  HEADS_IN,
  HEADS_OUT,
  dense,
  norm,
  rules,
)

NAME = 'transformers'
_PATCH = 'embeddings.patch_embeddings.projection.weight'
_PREFIX = 'vit.'  # ViTForImageClassification's backbone
# transformers' activations: exact GELU, or its tanh approximation.
_GELU = {'gelu': False, 'gelu_new': True, 'gelu_pytorch_tanh': True}


def _table(prefix: str):
  block = 'Transformer/encoderblock_{i}/'
  attention = block + 'MultiHeadDotProductAttention_1/'
  layer = prefix + 'encoder.layer.{i}.'

  return rules(
    ('cls', prefix + 'embeddings.cls_token'),
    (
      'Transformer/posembed_input/pos_embedding',
      prefix + 'embeddings.position_embeddings',
    ),
    *dense(
      'embedding', prefix + 'embeddings.patch_embeddings.projection', CONV
    ),
    *norm(block + 'LayerNorm_0', layer + 'layernorm_before'),
    *(
      rule
      for name in ('query', 'key', 'value')
      for rule in dense(
        attention + name,
        layer + 'attention.attention.' + name,
        HEADS_IN,
        HEADS_BIAS,
      )
    ),
    *dense(attention + 'out', layer + 'attention.output.dense', HEADS_OUT),
    *norm(block + 'LayerNorm_2', layer + 'layernorm_after'),
    *dense(block + 'MlpBlock_3/Dense_0', layer + 'intermediate.dense'),
    *dense(block + 'MlpBlock_3/Dense_1', layer + 'output.dense'),
    *norm('Transformer/encoder_norm', prefix + 'layernorm'),
    *dense('pre_logits', prefix + 'pooler.dense'),
    *dense('head', 'classifier'),
  )


def _config(path: epath.Path) -> dict[str, Any]:
  config = safetensors_file.config(path) or {}
  return config if config.get('model_type') == 'vit' else {}


def matches(path: epath.Path) -> bool:
  weights = safetensors_file.weights_file(path)
  if weights is None:
    return False
  keys = set(safetensors_file.keys(weights))
  return _PATCH in keys or _PREFIX + _PATCH in keys


def _known(config, path) -> dict[str, Any]:
  """Attributes that the config fixes and the shapes do not show."""
  act = config.get('hidden_act', 'gelu')
  problems = []
  if act not in _GELU:
    problems.append(f'hidden_act={act!r} (this project has {sorted(_GELU)})')
  if not config.get('qkv_bias', True):
    problems.append('qkv_bias=False')
  if config.get('pooler_act', 'tanh') != 'tanh':
    problems.append(f'pooler_act={config["pooler_act"]!r}')
  if problems:
    raise ValueError(f'{path}: this project has no ViT with {problems}.')
  return dict(
    gelu_approximate=_GELU[act],
    layer_norm_eps=float(config.get('layer_norm_eps', 1e-12)),
  )


def read(path: epath.Path, options: layout.ReadOptions):
  """(variables, description) of a transformers ViT snapshot."""
  layout.single_weights(path, options)
  weights = safetensors_file.weights_file(path)
  config = _config(path)
  if not config:
    raise ValueError(
      f'{path} is in the transformers ViT layout but has no config.json '
      "(model_type 'vit') beside it; put the hub snapshot's config.json "
      'next to the weights.'
    )
  flat = safetensors_file.read(weights)
  prefix = _PREFIX if _PREFIX + _PATCH in flat else ''
  table = _table(prefix)
  heads = int(config.get('num_attention_heads', 12))
  params = tree.unflatten(key_maps.to_ours(flat, table, heads, NAME))
  labels = config.get('id2label')
  description = infer.describe(
    params,
    model_name=options.model_name,
    source=path,
    image_size=int(config.get('image_size', 224)),
    **_known(config, path),
  )
  if labels and description.num_classes == len(labels):
    names = tuple(labels[str(i)] for i in range(len(labels)))
    description = description.replace(class_names=names)
  key_maps.check_shapes(
    {k: v.shape for k, v in flat.items()},
    key_maps.expected_shapes(
      description.build(), description.image_size, table, NAME
    ),
    f'{weights} does not fit {description.model_name} in the transformers '
    'layout',
  )
  return {'params': params}, description


LAYOUT = layout.Layout(
  name=NAME,
  expects="a transformers ViT model.safetensors (keys 'embeddings."
  "patch_embeddings.projection.weight', 'encoder.layer.{i}.attention."
  "attention.query.weight', ..., optionally under 'vit.') with its "
  "config.json (model_type 'vit')",
  matches=matches,
  read=read,
)

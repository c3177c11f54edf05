"""timm's state-dict names for this project's ViTs, hybrids and BiT ResNets.

The tables follow timm's own loader of the published .npz files
(`vision_transformer._load_weights`, `resnetv2._load_weights`): the same
tensors, PyTorch's (out, in) Linear and OIHW Conv2d shapes, and timm's fused
q-k-v projection (rows q, then k, then v, head-major).
"""

from vit_jax.checkpoints.key_maps import (
  CONV,
  CONV_HEAD,
  HEADS_BIAS,
  HEADS_IN,
  HEADS_OUT,
  Rule,
  dense,
  norm,
  rules,
)


def _fused(ours_prefix: str, names, theirs: str):
  """q/k/v of our attention <-> one fused PyTorch Linear."""
  return (
    (
      tuple(f'{ours_prefix}{n}/kernel' for n in names),
      theirs + '.weight',
      HEADS_IN,
    ),
    (
      tuple(f'{ours_prefix}{n}/bias' for n in names),
      theirs + '.bias',
      HEADS_BIAS,
    ),
  )


def _attention(ours: str, qkv: str, proj: str):
  return (
    *_fused(ours, ('query', 'key', 'value'), qkv),
    (ours + 'out/kernel', proj + '.weight', HEADS_OUT),
    (ours + 'out/bias', proj + '.bias'),
  )


def _mlp(ours: str, theirs: str):
  return (
    *dense(ours + 'Dense_0', theirs + '.fc1'),
    *dense(ours + 'Dense_1', theirs + '.fc2'),
  )


_BLOCK = 'Transformer/encoderblock_{i}/'
_MAP = 'MAPHead_0/'
_MAP_ATTENTION = _MAP + 'MultiHeadDotProductAttention_0/'

VIT: tuple[Rule, ...] = rules(
  ('cls', 'cls_token'),
  ('Transformer/posembed_input/pos_embedding', 'pos_embed'),
  *dense('embedding', 'patch_embed.proj', CONV),
  *norm(_BLOCK + 'LayerNorm_0', 'blocks.{i}.norm1'),
  *_attention(
    _BLOCK + 'MultiHeadDotProductAttention_1/',
    'blocks.{i}.attn.qkv',
    'blocks.{i}.attn.proj',
  ),
  *norm(_BLOCK + 'LayerNorm_2', 'blocks.{i}.norm2'),
  *_mlp(_BLOCK + 'MlpBlock_3/', 'blocks.{i}.mlp'),
  *norm('Transformer/encoder_norm', 'norm'),
  # timm's `global_pool='map'` (AttentionPoolLatent): a query Linear on the
  # latent and a fused key-value Linear on the tokens.
  (_MAP + 'probe', 'attn_pool.latent'),
  *dense(_MAP_ATTENTION + 'query', 'attn_pool.q', HEADS_IN, HEADS_BIAS),
  *_fused(_MAP_ATTENTION, ('key', 'value'), 'attn_pool.kv'),
  (_MAP_ATTENTION + 'out/kernel', 'attn_pool.proj.weight', HEADS_OUT),
  (_MAP_ATTENTION + 'out/bias', 'attn_pool.proj.bias'),
  *norm(_MAP + 'LayerNorm_0', 'attn_pool.norm'),
  *_mlp(_MAP + 'MlpBlock_0/', 'attn_pool.mlp'),
  # Older timm ViTs kept the representation layer.
  *dense('pre_logits', 'pre_logits.fc'),
  *dense('head', 'head'),
)

_BACKBONE = 'patch_embed.backbone.'
_UNIT = 'block{s+1}/unit{u+1}/'
_STAGE_UNIT = _BACKBONE + 'stages.{s}.blocks.{u}.'

# The hybrids' ResNet stages (timm's ResNetV2 with preact=False).
_HYBRID_STAGES = rules(
  ('conv_root/kernel', _BACKBONE + 'stem.conv.weight', CONV),
  *norm('gn_root', _BACKBONE + 'stem.norm'),
  (_UNIT + 'conv{r}/kernel', _STAGE_UNIT + 'conv{r}.weight', CONV),
  *norm(_UNIT + 'gn{r}', _STAGE_UNIT + 'norm{r}'),
  (_UNIT + 'conv_proj/kernel', _STAGE_UNIT + 'downsample.conv.weight', CONV),
  *norm(_UNIT + 'gn_proj', _STAGE_UNIT + 'downsample.norm'),
)
# R+ViT-Ti_16: timm's backbone is the stem alone, without a `stem.` scope.
_HYBRID_ROOT_ONLY = rules(
  ('conv_root/kernel', _BACKBONE + 'conv.weight', CONV),
  *norm('gn_root', _BACKBONE + 'norm'),
)

_BIT_UNIT = 'block{s+1}/unit{u+1:02d}/'
_BIT_STAGE_UNIT = 'stages.{s}.blocks.{u}.'

BIT: tuple[Rule, ...] = rules(
  ('root_block/standardized_conv2d/kernel', 'stem.conv.weight', CONV),
  *(
    rule
    for part, r in (('a', 1), ('b', 2), ('c', 3))
    for rule in (
      *norm(f'{_BIT_UNIT}{part}/group_norm', f'{_BIT_STAGE_UNIT}norm{r}'),
      (
        f'{_BIT_UNIT}{part}/standardized_conv2d/kernel',
        f'{_BIT_STAGE_UNIT}conv{r}.weight',
        CONV,
      ),
    )
  ),
  (
    _BIT_UNIT + 'a/proj/standardized_conv2d/kernel',
    _BIT_STAGE_UNIT + 'downsample.conv.weight',
    CONV,
  ),
  *norm('group_norm', 'norm'),
  *dense('head', 'head.fc', CONV_HEAD),
)


def for_model(family: str, root_only: bool = False) -> tuple[Rule, ...]:
  """The table of a registry family ('vit', 'hybrid' or 'bit').

  Reading accepts both hybrid stems; writing needs the model's
  (`root_only`: a hybrid without ResNet stages).
  """
  if family == 'bit':
    return BIT
  if family == 'hybrid':
    return VIT + (_HYBRID_ROOT_ONLY if root_only else _HYBRID_STAGES)
  return VIT


# Reading: any ViT or hybrid file.
VIT_OR_HYBRID = VIT + _HYBRID_STAGES + _HYBRID_ROOT_ONLY

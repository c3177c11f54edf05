"""Weight files of other codebases, written from their documented layouts.

Each function takes flat published keys ('Transformer/encoderblock_0/...',
as tests/numpy_reference.py reads them) and writes the same tensors under
another codebase's names and shapes, written out here from that codebase's
own loader (timm's `_load_weights`, transformers' conversion script,
big_vision's `vit.py`), not through this project's writers.
"""

import json

import ml_dtypes
import numpy as np
import safetensors.numpy

ATTENTION = 'MultiHeadDotProductAttention_1/'


def _qkv_weight(p, a, names):
  """Our (D, H, Dh) kernels -> PyTorch (H*Dh, D) rows, concatenated."""
  return np.concatenate(
    [p[a + n + '/kernel'].reshape(p[a + n + '/kernel'].shape[0], -1).T
     for n in names]
  )  # fmt: skip


def _qkv_bias(p, a, names):
  return np.concatenate([p[a + n + '/bias'].reshape(-1) for n in names])


def _out_weight(kernel):
  """(H, Dh, D) -> PyTorch (D, H*Dh)."""
  return kernel.reshape(-1, kernel.shape[-1]).T


def _conv(kernel):
  return kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW


def timm_vit(p, depth):
  """timm's VisionTransformer state dict (vision_transformer.py)."""
  sd = {
    'patch_embed.proj.weight': _conv(p['embedding/kernel']),
    'patch_embed.proj.bias': p['embedding/bias'],
    'norm.weight': p['Transformer/encoder_norm/scale'],
    'norm.bias': p['Transformer/encoder_norm/bias'],
    'head.weight': p['head/kernel'].T,
    'head.bias': p['head/bias'],
  }
  if 'cls' in p:
    sd['cls_token'] = p['cls']
  if 'Transformer/posembed_input/pos_embedding' in p:
    sd['pos_embed'] = p['Transformer/posembed_input/pos_embedding']
  for i in range(depth):
    b, t = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
    a = b + ATTENTION
    sd.update({
      t + 'norm1.weight': p[b + 'LayerNorm_0/scale'],
      t + 'norm1.bias': p[b + 'LayerNorm_0/bias'],
      t + 'attn.qkv.weight': _qkv_weight(p, a, ('query', 'key', 'value')),
      t + 'attn.qkv.bias': _qkv_bias(p, a, ('query', 'key', 'value')),
      t + 'attn.proj.weight': _out_weight(p[a + 'out/kernel']),
      t + 'attn.proj.bias': p[a + 'out/bias'],
      t + 'norm2.weight': p[b + 'LayerNorm_2/scale'],
      t + 'norm2.bias': p[b + 'LayerNorm_2/bias'],
      t + 'mlp.fc1.weight': p[b + 'MlpBlock_3/Dense_0/kernel'].T,
      t + 'mlp.fc1.bias': p[b + 'MlpBlock_3/Dense_0/bias'],
      t + 'mlp.fc2.weight': p[b + 'MlpBlock_3/Dense_1/kernel'].T,
      t + 'mlp.fc2.bias': p[b + 'MlpBlock_3/Dense_1/bias'],
    })  # fmt: skip
  if 'MAPHead_0/probe' in p:
    h = 'MAPHead_0/'
    a = h + 'MultiHeadDotProductAttention_0/'
    sd.update({
      'attn_pool.latent': p[h + 'probe'],
      'attn_pool.q.weight': _qkv_weight(p, a, ('query',)),
      'attn_pool.q.bias': _qkv_bias(p, a, ('query',)),
      'attn_pool.kv.weight': _qkv_weight(p, a, ('key', 'value')),
      'attn_pool.kv.bias': _qkv_bias(p, a, ('key', 'value')),
      'attn_pool.proj.weight': _out_weight(p[a + 'out/kernel']),
      'attn_pool.proj.bias': p[a + 'out/bias'],
      'attn_pool.norm.weight': p[h + 'LayerNorm_0/scale'],
      'attn_pool.norm.bias': p[h + 'LayerNorm_0/bias'],
      'attn_pool.mlp.fc1.weight': p[h + 'MlpBlock_0/Dense_0/kernel'].T,
      'attn_pool.mlp.fc1.bias': p[h + 'MlpBlock_0/Dense_0/bias'],
      'attn_pool.mlp.fc2.weight': p[h + 'MlpBlock_0/Dense_1/kernel'].T,
      'attn_pool.mlp.fc2.bias': p[h + 'MlpBlock_0/Dense_1/bias'],
    })  # fmt: skip
  return sd


def timm_hybrid(p, depth, stages):
  """timm's hybrid: ResNetV2 (preact=False) backbone under patch_embed."""
  sd = timm_vit(p, depth)
  bb = 'patch_embed.backbone.'
  sd[bb + 'stem.conv.weight'] = _conv(p['conv_root/kernel'])
  sd[bb + 'stem.norm.weight'] = p['gn_root/scale']
  sd[bb + 'stem.norm.bias'] = p['gn_root/bias']
  for s, units in enumerate(stages):
    for u in range(units):
      n, t = f'block{s + 1}/unit{u + 1}/', f'{bb}stages.{s}.blocks.{u}.'
      for r in (1, 2, 3):
        sd[f'{t}conv{r}.weight'] = _conv(p[f'{n}conv{r}/kernel'])
        sd[f'{t}norm{r}.weight'] = p[f'{n}gn{r}/scale']
        sd[f'{t}norm{r}.bias'] = p[f'{n}gn{r}/bias']
      if n + 'conv_proj/kernel' in p:
        sd[t + 'downsample.conv.weight'] = _conv(p[n + 'conv_proj/kernel'])
        sd[t + 'downsample.norm.weight'] = p[n + 'gn_proj/scale']
        sd[t + 'downsample.norm.bias'] = p[n + 'gn_proj/bias']
  return sd


def timm_bit(p, stages):
  """timm's resnetv2_*_bit from the BiT authors' keys ('resnet/...')."""
  p = {k.removeprefix('resnet/'): v for k, v in p.items()}
  sd = {
    'stem.conv.weight': _conv(p['root_block/standardized_conv2d/kernel']),
    'norm.weight': p['group_norm/gamma'],
    'norm.bias': p['group_norm/beta'],
    'head.fc.weight': p['head/conv2d/kernel'][0, 0].T[:, :, None, None],
    'head.fc.bias': p['head/conv2d/bias'],
  }
  for s, units in enumerate(stages):
    for u in range(units):
      n, t = f'block{s + 1}/unit{u + 1:02d}/', f'stages.{s}.blocks.{u}.'
      for part, r in (('a', 1), ('b', 2), ('c', 3)):
        sd[f'{t}norm{r}.weight'] = p[f'{n}{part}/group_norm/gamma']
        sd[f'{t}norm{r}.bias'] = p[f'{n}{part}/group_norm/beta']
        sd[f'{t}conv{r}.weight'] = _conv(
          p[f'{n}{part}/standardized_conv2d/kernel']
        )
      if u == 0:
        sd[t + 'downsample.conv.weight'] = _conv(
          p[n + 'a/proj/standardized_conv2d/kernel']
        )
  return sd


def transformers_vit(p, depth, prefix='vit.'):
  """transformers' ViTForImageClassification (prefix 'vit.') or ViTModel
  (prefix '', with the pooler from 'pre_logits')."""
  e = prefix + 'embeddings.'
  sd = {
    e + 'cls_token': p['cls'],
    e + 'position_embeddings': p['Transformer/posembed_input/pos_embedding'],
    e + 'patch_embeddings.projection.weight': _conv(p['embedding/kernel']),
    e + 'patch_embeddings.projection.bias': p['embedding/bias'],
    prefix + 'layernorm.weight': p['Transformer/encoder_norm/scale'],
    prefix + 'layernorm.bias': p['Transformer/encoder_norm/bias'],
  }
  if 'head/kernel' in p:
    sd['classifier.weight'] = p['head/kernel'].T
    sd['classifier.bias'] = p['head/bias']
  if 'pre_logits/kernel' in p:
    sd[prefix + 'pooler.dense.weight'] = p['pre_logits/kernel'].T
    sd[prefix + 'pooler.dense.bias'] = p['pre_logits/bias']
  for i in range(depth):
    b, t = f'Transformer/encoderblock_{i}/', f'{prefix}encoder.layer.{i}.'
    a = b + ATTENTION
    for n in ('query', 'key', 'value'):
      sd[f'{t}attention.attention.{n}.weight'] = _qkv_weight(p, a, (n,))
      sd[f'{t}attention.attention.{n}.bias'] = _qkv_bias(p, a, (n,))
    sd.update({
      t + 'attention.output.dense.weight': _out_weight(p[a + 'out/kernel']),
      t + 'attention.output.dense.bias': p[a + 'out/bias'],
      t + 'layernorm_before.weight': p[b + 'LayerNorm_0/scale'],
      t + 'layernorm_before.bias': p[b + 'LayerNorm_0/bias'],
      t + 'layernorm_after.weight': p[b + 'LayerNorm_2/scale'],
      t + 'layernorm_after.bias': p[b + 'LayerNorm_2/bias'],
      t + 'intermediate.dense.weight': p[b + 'MlpBlock_3/Dense_0/kernel'].T,
      t + 'intermediate.dense.bias': p[b + 'MlpBlock_3/Dense_0/bias'],
      t + 'output.dense.weight': p[b + 'MlpBlock_3/Dense_1/kernel'].T,
      t + 'output.dense.bias': p[b + 'MlpBlock_3/Dense_1/bias'],
    })  # fmt: skip
  return sd


def transformers_config(width, depth, heads, mlp, patch, image, classes):
  """A transformers ViTConfig as the hub's config.json has it."""
  config = {
    'architectures': ['ViTForImageClassification' if classes else 'ViTModel'],
    'model_type': 'vit',
    'hidden_size': width,
    'num_hidden_layers': depth,
    'num_attention_heads': heads,
    'intermediate_size': mlp,
    'hidden_act': 'gelu',
    'hidden_dropout_prob': 0.0,
    'attention_probs_dropout_prob': 0.0,
    'layer_norm_eps': 1e-12,
    'image_size': image,
    'patch_size': patch,
    'num_channels': 3,
    'qkv_bias': True,
  }
  if classes:
    config['id2label'] = {str(i): f'class_{i}' for i in range(classes)}
    config['label2id'] = {f'class_{i}': i for i in range(classes)}
  return config


def big_vision_vit(p, depth, scan=False, bfloat16=()):
  """big_vision's ViT train state: 'params/' + per-type block numbering,
  top-level 'pos_embedding' without the class token's row (which must be
  zero in `p`), optional scanned blocks, and `bfloat16` keys stored as raw
  2-byte void as numpy saves them."""
  out = {}
  for key, value in p.items():
    key = key.replace(ATTENTION, 'MultiHeadDotProductAttention_0/')
    key = key.replace('LayerNorm_2/', 'LayerNorm_1/')
    key = key.replace('MlpBlock_3/', 'MlpBlock_0/')
    if key == 'Transformer/posembed_input/pos_embedding':
      key = 'pos_embedding'
      if 'cls' in p:
        assert not value[:, 0].any()
        value = value[:, 1:]
    out[key] = value
  if scan:
    blocks = [f'Transformer/encoderblock_{i}/' for i in range(depth)]
    for key in [k for k in out if k.startswith(blocks[0])]:
      rest = key[len(blocks[0]) :]
      out['Transformer/encoderblock/' + rest] = np.stack(
        [out.pop(b + rest) for b in blocks]
      )
  for key in bfloat16:
    out[key] = np.asarray(out[key], ml_dtypes.bfloat16).view('V2')
  state = {'params/' + k: v for k, v in out.items()}
  state['opt/mu/head/kernel'] = np.zeros(3)  # Optimizer state: skipped.
  return state


def write_safetensors(path, state_dict, config=None):
  """Writes model.safetensors (and config.json beside it)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(
    {k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()},
    str(path),
    metadata={'format': 'pt'},
  )
  if config is not None:
    (path.parent / 'config.json').write_text(json.dumps(config))
  return path

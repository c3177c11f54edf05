"""Float64 numpy forward passes written from the paper and the file layout.

They read flat published keys ('Transformer/encoderblock_0/...') and share no
code with vit_jax, so agreement checks both the maths and the names.
"""

import math

import numpy as np
from scipy import special


def layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_exact(x):
  return 0.5 * x * (1 + special.erf(x / math.sqrt(2)))


def posemb_sincos_2d(rows, cols, width, temperature=10_000.0):
  """(1, rows * cols, width): [sin(x w), cos(x w), sin(y w), cos(y w)] for
  the token at row y, column x (row-major), w_k = T^(-k / (width/4 - 1))."""
  quarter = width // 4
  w = np.array([temperature ** (-k / (quarter - 1)) for k in range(quarter)])
  rows_out = []
  for y in range(rows):
    for x in range(cols):
      rows_out.append(
        np.concatenate(
          [np.sin(x * w), np.cos(x * w), np.sin(y * w), np.cos(y * w)]
        )
      )
  return np.stack(rows_out)[None]


def softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def conv2d(x, w, stride, pad):
  """x (B, H, W, C), w (kh, kw, C, O), pad ((top, bottom), (left, right))."""
  x = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  kh, kw, _, _ = w.shape
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = x[
        :, i : i + stride * out_h : stride, j : j + stride * out_w : stride
      ]
      out += patch @ w[i, j]
  return out


def same_padding(size, kernel, stride):
  """TensorFlow's 'SAME' padding (more at the end when odd)."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return (total // 2, total - total // 2)


def max_pool(x, pad_value, pad):
  x = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)), constant_values=pad_value)
  out_h = (x.shape[1] - 3) // 2 + 1
  out_w = (x.shape[2] - 3) // 2 + 1
  out = np.full((x.shape[0], out_h, out_w, x.shape[3]), -np.inf)
  for i in range(3):
    for j in range(3):
      out = np.maximum(out, x[:, i : i + 2 * out_h : 2, j : j + 2 * out_w : 2])
  return out


def group_norm(x, scale, bias, eps, groups=32):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean((1, 2, 4), keepdims=True)
  var = g.var((1, 2, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + eps)
  return g.reshape(b, h, w, c) * scale + bias


def standardize_std(w, eps=1e-5):
  """The hybrids' weight standardisation: (w - mean) / (std + eps)."""
  w = w - w.mean((0, 1, 2), keepdims=True)
  return w / (w.std((0, 1, 2), keepdims=True) + eps)


def standardize_var(w, eps=1e-8):
  """BiT's weight standardisation: (w - mean) / sqrt(var + eps)."""
  w = w - w.mean((0, 1, 2), keepdims=True)
  return w / np.sqrt((w**2).mean((0, 1, 2), keepdims=True) + eps)


# ----------------------------------------------------------------------------


def dot_product_attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v on (batch, tokens, heads, d) inputs."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  return np.einsum('bhqk,bkhd->bqhd', softmax(logits), v)


def dot_product_attention_vjp(q, k, v, g):
  """The gradients (dq, dk, dv) of sum(dot_product_attention(q, k, v) * g).

  With S = q k^T / sqrt(d), P = softmax(S), O = P v: dv = P^T g,
  dP = g v^T, dS = P * (dP - rowsum(dP * P)), dq = dS k / sqrt(d),
  dk = dS^T q / sqrt(d).
  """
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  scale = q.shape[-1] ** -0.5
  p = softmax(np.einsum('bqhd,bkhd->bhqk', q, k) * scale)
  dp = np.einsum('bqhd,bkhd->bhqk', g, v)
  ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
  return (
    np.einsum('bhqk,bkhd->bqhd', ds, k) * scale,
    np.einsum('bhqk,bqhd->bkhd', ds, q) * scale,
    np.einsum('bhqk,bqhd->bkhd', p, g),
  )


def attention(p, a, x_q, x_kv):
  """Multi-head attention with the kernels under prefix `a` (self-attention
  when `x_kv` is None)."""
  x_kv = x_q if x_kv is None else x_kv

  def project(name, x):
    kernel, bias = p[a + name + '/kernel'], p[a + name + '/bias']
    return np.einsum('btd,dhk->bthk', x, kernel) + bias

  q, k, v = project('query', x_q), project('key', x_kv), project('value', x_kv)
  heads = dot_product_attention(q, k, v)
  return (
    np.einsum('bqhk,hkd->bqd', heads, p[a + 'out/kernel']) + p[a + 'out/bias']
  )


def mlp(p, m, x, gelu):
  y = gelu(x @ p[m + 'Dense_0/kernel'] + p[m + 'Dense_0/bias'])
  return y @ p[m + 'Dense_1/kernel'] + p[m + 'Dense_1/bias']


def encoder(p, x, num_layers, gelu=gelu_tanh, learned_posemb=True, eps=1e-6):
  """Equations (2)-(4) before pooling: blocks and the final LayerNorm."""
  if learned_posemb:
    x = x + p['Transformer/posembed_input/pos_embedding']

  def ln(x, name):
    return layer_norm(x, p[name + '/scale'], p[name + '/bias'], eps)

  for i in range(num_layers):
    b = f'Transformer/encoderblock_{i}/'
    x = x + attention(
      p, b + 'MultiHeadDotProductAttention_1/', ln(x, b + 'LayerNorm_0'), None
    )
    x = x + mlp(p, b + 'MlpBlock_3/', ln(x, b + 'LayerNorm_2'), gelu)
  return ln(x, 'Transformer/encoder_norm')


def map_head(p, x, gelu, eps=1e-6):
  """big_vision's MAPHead: a probe attends to the tokens, then x + MLP(LN(x))
  at the probe."""
  h = 'MAPHead_0/'
  probe = np.broadcast_to(p[h + 'probe'], (x.shape[0], 1, x.shape[-1]))
  x = attention(p, h + 'MultiHeadDotProductAttention_0/', probe, x)
  y = layer_norm(x, p[h + 'LayerNorm_0/scale'], p[h + 'LayerNorm_0/bias'], eps)
  return (x + mlp(p, h + 'MlpBlock_0/', y, gelu))[:, 0]


def vit_head(
  p, tokens, num_layers, classifier, gelu=gelu_tanh, sincos_grid=None, eps=1e-6
):
  """Position embedding, class token, encoder, pooling, pre-logits, head.

  With `sincos_grid` (rows, columns) the fixed sin-cos embedding is added to
  the patch tokens, before the class token is prepended; otherwise the
  learned one is added after. `eps` is the LayerNorms' epsilon.
  """
  if sincos_grid is not None:
    tokens = tokens + posemb_sincos_2d(*sincos_grid, tokens.shape[-1])
  if classifier == 'token':
    cls = np.broadcast_to(p['cls'], (tokens.shape[0], 1, tokens.shape[-1]))
    tokens = np.concatenate([cls, tokens], axis=1)
  x = encoder(p, tokens, num_layers, gelu, sincos_grid is None, eps)
  if classifier == 'token':
    x = x[:, 0]
  elif classifier == 'map':
    x = map_head(p, x, gelu, eps)
  else:
    x = x.mean(1)
  if 'pre_logits/kernel' in p:
    x = np.tanh(x @ p['pre_logits/kernel'] + p['pre_logits/bias'])
  return x @ p['head/kernel'] + p['head/bias']


def vit(
  p,
  images,
  patch,
  num_layers,
  classifier='token',
  gelu_approximate=True,
  posemb='learn',
  eps=1e-6,
):
  """The paper's ViT on images (B, H, W, 3), with big_vision's options
  (and Hugging Face's LayerNorm epsilon `eps`)."""
  x = conv2d(images, p['embedding/kernel'], patch, ((0, 0), (0, 0)))
  x = x + p['embedding/bias']
  grid = x.shape[1:3] if posemb == 'sincos2d' else None
  tokens = x.reshape(x.shape[0], -1, x.shape[-1])
  gelu = gelu_tanh if gelu_approximate else gelu_exact
  return vit_head(p, tokens, num_layers, classifier, gelu, grid, eps)


def hybrid(p, images, stages, num_layers, patch=1):
  """ResNet+ViT: post-activation ResNet with 'SAME' padding, then ViT."""

  def conv(x, w, stride):
    pad = tuple(same_padding(size, w.shape[0], stride) for size in x.shape[1:3])
    return conv2d(x, standardize_std(w), stride, pad)

  def gn(x, name):
    return group_norm(x, p[name + '/scale'], p[name + '/bias'], 1e-6)

  x = conv(images, p['conv_root/kernel'], 2)
  x = np.maximum(gn(x, 'gn_root'), 0)
  pad = tuple(same_padding(size, 3, 2) for size in x.shape[1:3])
  x = max_pool(x, -np.inf, pad)
  for s, units in enumerate(stages):
    for u in range(units):
      n = f'block{s + 1}/unit{u + 1}/'
      stride = 2 if s > 0 and u == 0 else 1
      residual = x
      if n + 'conv_proj/kernel' in p:
        residual = gn(conv(x, p[n + 'conv_proj/kernel'], stride), n + 'gn_proj')
      y = np.maximum(gn(conv(x, p[n + 'conv1/kernel'], 1), n + 'gn1'), 0)
      y = np.maximum(gn(conv(y, p[n + 'conv2/kernel'], stride), n + 'gn2'), 0)
      y = gn(conv(y, p[n + 'conv3/kernel'], 1), n + 'gn3')
      x = np.maximum(residual + y, 0)
  x = (
    conv2d(x, p['embedding/kernel'], patch, ((0, 0), (0, 0)))
    + p['embedding/bias']
  )
  tokens = x.reshape(x.shape[0], -1, x.shape[-1])
  return vit_head(p, tokens, num_layers, 'token')


def bit(p, images, stages):
  """BiT ResNetV2 from the BiT authors' keys (prefix 'resnet/')."""
  p = {k.removeprefix('resnet/'): v for k, v in p.items()}

  def conv(x, name, stride):
    w = standardize_var(p[name + '/standardized_conv2d/kernel'])
    pad = (w.shape[0] - 1) // 2
    return conv2d(x, w, stride, ((pad, pad), (pad, pad)))

  def gn_relu(x, name):
    gamma, beta = p[name + '/group_norm/gamma'], p[name + '/group_norm/beta']
    return np.maximum(group_norm(x, gamma, beta, 1e-5), 0)

  x = conv(images, 'root_block', 2)
  x = max_pool(x, 0.0, ((1, 1), (1, 1)))
  for s, units in enumerate(stages):
    for u in range(units):
      n = f'block{s + 1}/unit{u + 1:02d}/'
      stride = 2 if s > 0 and u == 0 else 1
      pre = gn_relu(x, n + 'a')
      shortcut = conv(pre, n + 'a/proj', stride) if u == 0 else x
      y = conv(pre, n + 'a', 1)
      y = conv(gn_relu(y, n + 'b'), n + 'b', stride)
      y = conv(gn_relu(y, n + 'c'), n + 'c', 1)
      x = y + shortcut
  x = np.maximum(
    group_norm(x, p['group_norm/gamma'], p['group_norm/beta'], 1e-5), 0
  )
  x = x.mean((1, 2))
  return x @ p['head/conv2d/kernel'][0, 0] + p['head/conv2d/bias']

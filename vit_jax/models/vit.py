"""The Vision Transformer (Dosovitskiy et al., ICLR 2021) and its stems.

Equations (1)-(4) of the paper:
  z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos
  z'_l = MSA(LN(z_{l-1})) + z_{l-1}
  z_l = MLP(LN(z'_l)) + z'_l
  y = LN(z_L^0)

Module and parameter names follow the published checkpoints, including the
global numbering inside a block (LayerNorm_0, MultiHeadDotProductAttention_1,
LayerNorm_2, MlpBlock_3), so a parameter tree of this module *is* the
published layout. Three stems produce the tokens: the patchify conv (ViT),
the hybrids' ResNet followed by a 1x1 "patch" conv (R50+ViT), and a stack of
3x3 convs with BatchNorm (ViTc, Xiao et al., NeurIPS 2021).
"""

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import common, resnet

CLASSIFIERS = ('token', 'gap', 'unpooled', 'token_unpooled')
LN_EPS = 1e-6

xavier_uniform = nn.initializers.xavier_uniform()


def _layer_norm(dtype, name):
  return nn.LayerNorm(
    epsilon=LN_EPS,
    dtype=dtype,
    scale_init=common.partitioned(nn.initializers.ones, ('embed',)),
    bias_init=common.partitioned(nn.initializers.zeros, ('embed',)),
    name=name,
  )


class AddPositionEmbs(nn.Module):
  """Adds a learned 1D position embedding, one row per token."""

  @nn.compact
  def __call__(self, x):
    pos_embedding = self.param(
      'pos_embedding',
      common.partitioned(
        nn.initializers.normal(stddev=0.02), (None, 'length', 'embed')
      ),
      (1, *x.shape[1:]),
    )
    return x + pos_embedding.astype(x.dtype)


class MlpBlock(nn.Module):
  """Dense(D->M) -> GELU (tanh approximation) -> Dense(M->D), with dropout."""

  mlp_dim: int
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    dtype = common.compute_dtype(self.dtype)
    features = x.shape[-1]
    # Both layers take float32 operands (dtype=None promotes to them) and
    # round them to `dtype` inside their dot_general, so that the kernels'
    # gradients are float32 products, never rounded to `dtype`. The hidden
    # layer's bias and GELU run on its float32 product, rounded to `dtype`
    # after the GELU: adding the bias in bfloat16 made its gradient a
    # bfloat16 reduction over batch and tokens, which XLA:CPU runs as a slow
    # tree of reduce-windows.
    x = nn.Dense(
      self.mlp_dim,
      dtype=None,
      dot_general=common.dot_general(dtype, jnp.float32),
      kernel_init=common.partitioned(xavier_uniform, ('embed', 'mlp')),
      bias_init=common.partitioned(nn.initializers.normal(1e-6), ('mlp',)),
      name='Dense_0',
    )(x)
    x = common.constrain(x, ('batch', 'length', 'act_mlp'))
    x = nn.gelu(x, approximate=True).astype(dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=self.deterministic)
    x = nn.Dense(
      features,
      dtype=None,
      # Added to the float32 residual stream: no rounding to `dtype`.
      dot_general=common.dot_general(dtype, jnp.float32),
      kernel_init=common.partitioned(xavier_uniform, ('mlp', 'embed')),
      bias_init=common.partitioned(nn.initializers.normal(1e-6), ('embed',)),
      name='Dense_1',
    )(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=self.deterministic)


def attention_weights(query: jax.Array, key: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) in float32, shape (batch, heads, q, k)."""
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum(
    'bqhd,bkhd->bhqk', query, key, preferred_element_type=jnp.float32
  )
  return jax.nn.softmax(logits * scale, axis=-1)


def _attention_dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def product_attention(
  query: jax.Array, key: jax.Array, value: jax.Array
) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v on (batch, length, heads, head_dim) inputs.

  The same function as `jax.nn.dot_product_attention`, written so that all
  six products of the forward and backward passes take operands of the
  inputs' dtype and accumulate in float32, each as one batched matmul over
  the (batch, length, heads, head_dim) layout. The softmax and its gradient
  are float32. `jax.nn.dot_product_attention` computes its value product as
  bfloat16 -> bfloat16 and its backward products with float32 cotangents;
  XLA:CPU runs both as float32 matmuls, about 2x slower than this for the
  forward and backward passes of a ViT-B/16 attention layer (batch 8) on an
  AMX CPU, and it failed to run some of them at all (an unsupported
  bfloat16 x bfloat16 -> float32 matmul) next to the bfloat16 backward
  products of `common.mixed_dot_general`.
  """
  return _product_attention_fwd(query, key, value)[0]


def _product_attention_fwd(query, key, value):
  scale = query.shape[-1] ** -0.5
  logits = _attention_dot('bqhd,bkhd->bhqk', query, key) * scale
  weights = jax.nn.softmax(logits, axis=-1).astype(query.dtype)
  out = _attention_dot('bhqk,bkhd->bqhd', weights, value).astype(query.dtype)
  return out, (query, key, value, weights, out)


def _product_attention_bwd(residuals, out_grad):
  query, key, value, weights, out = residuals
  dtype = query.dtype
  scale = query.shape[-1] ** -0.5
  out_grad = out_grad.astype(dtype)
  weights_grad = _attention_dot('bqhd,bkhd->bhqk', out_grad, value)
  # Softmax backward: dS = P * (dP - rowsum(dP * P)), rowsum(dP * P) being
  # rowsum(dO * O), which is cheaper.
  row = jnp.einsum(
    'bqhd,bqhd->bhq', out_grad.astype(jnp.float32), out.astype(jnp.float32)
  )
  logits_grad = (
    weights.astype(jnp.float32) * (weights_grad - row[..., None]) * scale
  ).astype(dtype)
  query_grad = _attention_dot('bhqk,bkhd->bqhd', logits_grad, key)
  key_grad = _attention_dot('bhqk,bqhd->bkhd', logits_grad, query)
  value_grad = _attention_dot('bhqk,bqhd->bkhd', weights, out_grad)
  return (
    query_grad.astype(dtype),
    key_grad.astype(dtype),
    value_grad.astype(dtype),
  )


product_attention.defvjp(_product_attention_fwd, _product_attention_bwd)


def use_product_attention(dtype) -> bool:
  """Whether attention runs `product_attention` instead of jax.nn's.

  Only for bfloat16 compute on CPUs (XLA:CPU), where
  `jax.nn.dot_product_attention` runs as float32 matmuls (see
  `product_attention`). Elsewhere `jax.nn.dot_product_attention`: it
  dispatches to fused kernels on GPUs, and in float32 on XLA:CPU it was
  not slower than `product_attention` in a ViT-B/16 training step.
  """
  return jax.default_backend() == 'cpu' and dtype == jnp.bfloat16


def _flattened_init(init, num_input_dims: int):
  """Initialises an N-d kernel as the 2-D (fan_in, fan_out) matrix it acts as.

  Keeps xavier_uniform's fans equal to the published code's for the
  (D, H, Dh) and (H, Dh, D) attention kernels.
  """

  def flat_init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[:num_input_dims])
    return init(key, (fan_in, math.prod(shape) // fan_in), dtype).reshape(shape)

  return flat_init


class HeadProjection(nn.Module):
  """A dense layer contracting the last `num_input_dims` axes of its input.

  (B, T, D) -> (B, T, H, Dh) for query/key/value, and (B, T, H, Dh) ->
  (B, T, D) for the output, with the published kernel shapes.
  """

  features: tuple[int, ...]
  num_input_dims: int
  kernel_axes: tuple[str, ...]
  bias_axes: tuple[str, ...]
  dtype: str = 'float32'
  output_dtype: str | None = None

  @nn.compact
  def __call__(self, x):
    dtype = common.compute_dtype(self.dtype)
    in_shape = x.shape[-self.num_input_dims :]
    kernel = self.param(
      'kernel',
      common.partitioned(
        _flattened_init(xavier_uniform, self.num_input_dims), self.kernel_axes
      ),
      (*in_shape, *self.features),
    )
    bias = self.param(
      'bias',
      common.partitioned(nn.initializers.zeros, self.bias_axes),
      self.features,
    )
    contract = (
      tuple(range(x.ndim - self.num_input_dims, x.ndim)),
      tuple(range(self.num_input_dims)),
    )
    dimension_numbers = (contract, ((), ()))
    if dtype == jnp.float32:
      y = jax.lax.dot_general(x, kernel, dimension_numbers)
    else:
      # The float32 kernel goes in uncast: its gradient stays float32.
      y = common.mixed_dot_general(
        x, kernel, dimension_numbers, dtype, jnp.float32
      )
    return (y + bias).astype(self.output_dtype or dtype)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head self-attention with the published (D, H, Dh) kernels.

  The fast path is `jax.nn.dot_product_attention` (fused on GPUs). The
  weights are formed explicitly only when they are needed: for attention
  dropout, or when the caller collects 'intermediates' (attention maps for
  inspection), in which case they are sown as 'attention_weights'.
  """

  num_heads: int
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    if features % self.num_heads:
      raise ValueError(
        f'Hidden size {features} is not divisible by {self.num_heads} heads.'
      )
    dtype = common.compute_dtype(self.dtype)
    heads = (self.num_heads, features // self.num_heads)
    projection = functools.partial(
      HeadProjection,
      features=heads,
      num_input_dims=1,
      kernel_axes=('embed', 'heads', 'kv'),
      bias_axes=('heads', 'kv'),
      dtype=self.dtype,
    )
    head_axes = ('batch', 'length', 'act_heads', 'act_kv')
    query = common.constrain(projection(name='query')(x), head_axes)
    key = common.constrain(projection(name='key')(x), head_axes)
    value = common.constrain(projection(name='value')(x), head_axes)

    use_dropout = self.dropout_rate > 0.0 and not self.deterministic
    if use_dropout or self.is_mutable_collection('intermediates'):
      weights = attention_weights(query, key)
      self.sow('intermediates', 'attention_weights', weights)
      weights = nn.Dropout(self.dropout_rate)(
        weights, deterministic=not use_dropout
      )
      out = jnp.einsum(
        'bhqk,bkhd->bqhd',
        weights.astype(dtype),
        value,
        preferred_element_type=jnp.float32,
      ).astype(dtype)
    elif use_product_attention(dtype):
      out = product_attention(query, key, value)
    else:
      out = jax.nn.dot_product_attention(query, key, value)
    out = common.constrain(out, head_axes)
    return HeadProjection(
      features=(features,),
      num_input_dims=2,
      kernel_axes=('heads', 'kv', 'embed'),
      bias_axes=('embed',),
      dtype=self.dtype,
      output_dtype='float32',
      name='out',
    )(out)


class EncoderBlock(nn.Module):
  """Pre-LN Transformer block: equations (2) and (3), on a float32 stream."""

  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    dtype = common.compute_dtype(self.dtype)
    y = _layer_norm(dtype, 'LayerNorm_0')(x)
    y = MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dropout_rate=self.attention_dropout_rate,
      deterministic=self.deterministic,
      dtype=self.dtype,
      name='MultiHeadDotProductAttention_1',
    )(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
    x = x + y.astype(jnp.float32)
    y = _layer_norm(dtype, 'LayerNorm_2')(x)
    y = MlpBlock(
      mlp_dim=self.mlp_dim,
      dropout_rate=self.dropout_rate,
      deterministic=self.deterministic,
      dtype=self.dtype,
      name='MlpBlock_3',
    )(y)
    x = x + y.astype(jnp.float32)
    return common.constrain(x, ('batch', 'length', 'act_embed'))


def _scan_body(block, carry, _):
  return block(carry), None


class Encoder(nn.Module):
  """Position embedding, `num_layers` blocks and the final LayerNorm.

  With `scan`, the blocks are one `nn.scan` over stacked parameters
  (`encoderblock/...` with a leading layer axis): compile time no longer
  grows with depth. `remat_policy` rematerialises each block.
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: str = 'float32'
  scan: bool = False
  remat_policy: str = 'none'

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    # The residual stream stays float32 whatever the compute dtype (as under
    # torch autocast): each block reads it through a LayerNorm that rounds to
    # the compute dtype, and adds its output back in float32. This halves the
    # bfloat16 error of the logits at little cost.
    x = AddPositionEmbs(name='posembed_input')(x.astype(jnp.float32))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    block = EncoderBlock
    policy = common.remat_policy(self.remat_policy)
    if self.remat_policy != 'none':
      block = nn.remat(block, policy=policy, prevent_cse=not self.scan)
    block_kwargs = dict(
      mlp_dim=self.mlp_dim,
      num_heads=self.num_heads,
      dropout_rate=self.dropout_rate,
      attention_dropout_rate=self.attention_dropout_rate,
      deterministic=not train,
      dtype=self.dtype,
    )
    if self.scan:
      scanned = nn.scan(
        _scan_body,
        variable_axes={'params': 0, 'intermediates': 0},
        split_rngs={'params': True, 'dropout': True},
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )
      x, _ = scanned(block(**block_kwargs, name='encoderblock'), x, None)
    else:
      for i in range(self.num_layers):
        x = block(**block_kwargs, name=f'encoderblock_{i}')(x)
    # Float32 too: it feeds the float32 head.
    return _layer_norm(jnp.float32, 'encoder_norm')(x)


class VisionTransformer(nn.Module):
  """ViT classifier; also the R50+ViT hybrids and the conv-stem ViTc.

  Attributes:
    num_classes: output classes; None or 0 returns the features that the
      head would see (the `pre_logits` output).
    patch_size: side of the square patches (1 on a hybrid's feature map).
    hidden_size: token width D.
    num_layers: number of encoder blocks L.
    mlp_dim: MLP hidden width M.
    num_heads: attention heads (D / heads = 64 for the paper's sizes).
    dropout_rate: dropout after the position embedding and every dense
      layer except the attention projections.
    attention_dropout_rate: dropout on the attention weights.
    classifier: 'token' (class token), 'gap' (mean of all tokens, no class
      token), 'unpooled' (head on every token), 'token_unpooled' (class token
      added, head on every token).
    representation_size: width of the pre-logits Dense + tanh layer, or None.
    resnet_stages: units per stage of a hybrid's ResNet, None for no ResNet.
    resnet_width: the hybrid ResNet's width factor.
    conv_stem: (features, stride) of each 3x3 conv of a ViTc stem, None for
      the patchify stem.
    head_bias_init: initial head bias (-10 for sigmoid pretraining).
    dtype: compute dtype name, 'float32' or 'bfloat16'.
    scan: scan over the encoder blocks (stacked parameters).
    remat_policy: rematerialisation policy of each block.
    bn_axis_name: mesh axis names over which a ViTc stem's BatchNorm averages
      statistics inside `shard_map`; under `jit` the statistics are global
      already and this stays None.
  """

  num_classes: int | None
  patch_size: int
  hidden_size: int
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  classifier: str = 'token'
  representation_size: int | None = None
  resnet_stages: Sequence[int] | None = None
  resnet_width: float = 1.0
  conv_stem: Sequence[tuple[int, int]] | None = None
  head_bias_init: float = 0.0
  dtype: str = 'float32'
  scan: bool = False
  remat_policy: str = 'none'
  bn_axis_name: str | tuple[str, ...] | None = None

  def _check(self):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(
        f'Unknown classifier {self.classifier!r}; use one of {CLASSIFIERS}.'
      )
    if self.resnet_stages is not None and self.conv_stem is not None:
      raise ValueError('A ViT has one stem: set resnet_stages or conv_stem.')

  def _conv_stem(self, x, train):
    """ViTc stem: 3x3 conv -> BatchNorm -> ReLU, repeated (no bias)."""
    dtype = common.compute_dtype(self.dtype)
    for i, (features, stride) in enumerate(self.conv_stem):
      x = nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        use_bias=False,
        dtype=dtype,
        conv_general_dilated=common.conv_general_dilated(dtype),
        kernel_init=common.partitioned(
          nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
          resnet.CONV_AXES,
        ),
        name=f'stem_conv{i}',
      )(x)
      x = nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        axis_name=self.bn_axis_name,
        scale_init=common.partitioned(nn.initializers.ones, ('conv_out',)),
        bias_init=common.partitioned(nn.initializers.zeros, ('conv_out',)),
        name=f'stem_bn{i}',
      )(x)
      x = nn.relu(x)
    return x

  def _tokens(self, images, train):
    """Images (B, H, W, 3) in [-1, 1] -> patch tokens (B, N, D)."""
    dtype = common.compute_dtype(self.dtype)
    x = common.constrain(images.astype(dtype), ('batch', None, None, None))
    if self.resnet_stages is not None:
      x = resnet.hybrid_root(
        x, self.resnet_stages, self.resnet_width, self.dtype
      )
    elif self.conv_stem is not None:
      x = self._conv_stem(x, train)
    elif images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
      raise ValueError(
        f'Image size {images.shape[1:3]} is not a multiple of the patch size '
        f'{self.patch_size}.'
      )
    if self.conv_stem is None:
      kernel_init = nn.initializers.lecun_normal()
    else:  # ViTc's final 1x1 conv.
      kernel_init = nn.initializers.variance_scaling(1.0, 'fan_out', 'normal')
    x = nn.Conv(
      self.hidden_size,
      (self.patch_size, self.patch_size),
      strides=(self.patch_size, self.patch_size),
      padding='VALID',
      dtype=dtype,
      conv_general_dilated=common.conv_general_dilated(dtype),
      kernel_init=common.partitioned(
        kernel_init, (*resnet.CONV_AXES[:3], 'embed')
      ),
      bias_init=common.partitioned(nn.initializers.zeros, ('embed',)),
      name='embedding',
    )(x)
    batch, height, width, channels = x.shape
    return jnp.reshape(x, (batch, height * width, channels))

  def _pool(self, x):
    if self.classifier == 'token':
      return x[:, 0]
    if self.classifier == 'gap':
      return jnp.mean(x, axis=1)
    return x  # 'unpooled', 'token_unpooled'

  def _encode(self, tokens, train):
    """Patch tokens (B, N, D) -> encoder output (B, N [+1], D), float32.

    Prepends the class token (token classifiers) and runs the encoder.
    """
    x = tokens
    if self.classifier in ('token', 'token_unpooled'):
      cls = self.param(
        'cls',
        common.partitioned(nn.initializers.zeros, (None, None, 'embed')),
        (1, 1, self.hidden_size),
      )
      cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = common.constrain(x, ('batch', 'length', 'act_embed'))
    return Encoder(
      num_layers=self.num_layers,
      mlp_dim=self.mlp_dim,
      num_heads=self.num_heads,
      dropout_rate=self.dropout_rate,
      attention_dropout_rate=self.attention_dropout_rate,
      dtype=self.dtype,
      scan=self.scan,
      remat_policy=self.remat_policy,
      name='Transformer',
    )(x, train=train)

  def _head(self, x):
    """Encoder output -> pooled pre-logits features -> logits.

    Pooling and head are cheap and run in float32 (the encoder's output
    dtype), so that the logits are not rounded to the compute dtype.
    """
    x = self._pool(x)
    if self.representation_size:
      x = nn.Dense(
        self.representation_size,
        kernel_init=common.partitioned(
          nn.initializers.lecun_normal(), ('embed', 'representation')
        ),
        bias_init=common.partitioned(
          nn.initializers.zeros, ('representation',)
        ),
        name='pre_logits',
      )(x)
      x = jnp.tanh(x)
    if not self.num_classes:
      return x
    return nn.Dense(
      self.num_classes,
      kernel_init=common.partitioned(
        nn.initializers.zeros, ('embed', 'classes')
      ),
      bias_init=common.partitioned(
        nn.initializers.constant(self.head_bias_init), ('classes',)
      ),
      name='head',
    )(x)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check()
    tokens = self._tokens(images, train)
    return self._head(self._encode(tokens, train))

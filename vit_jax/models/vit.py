"""The Vision Transformer (Dosovitskiy et al., ICLR 2021) and its stems.

Equations (1)-(4) of the paper:
  z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos
  z'_l = MSA(LN(z_{l-1})) + z_{l-1}
  z_l = MLP(LN(z'_l)) + z'_l
  y = LN(z_L^0)

A parameter tree of this module *is* the published layout (see
`encoder`). Three stems produce the tokens: the patchify conv (ViT), the
hybrids' ResNet followed by a "patch" conv (R50+ViT, R26+ViT, R+ViT), and a
stack of 3x3 convs with BatchNorm (ViTc, Xiao et al., NeurIPS 2021). Options
for weights trained elsewhere: exact GELU (timm, Hugging Face), big_vision's
MAP pooling head and its fixed 2-D sin-cos position embedding.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
from absl import logging

from vit_jax.models import attention, common, resnet
from vit_jax.models.encoder import Encoder, MAPHead, posemb_sincos_2d
from vit_jax.models.patch_embedding import PatchEmbedding

# Imported from this module before they moved to `attention`.
product_attention = attention.product_attention
use_product_attention = attention.use_product_attention

CLASSIFIERS = ('token', 'gap', 'map', 'unpooled', 'token_unpooled')
POSEMBS = ('learn', 'sincos2d')


class VisionTransformer(nn.Module):
  """ViT classifier; also the ResNet+ViT hybrids and the conv-stem ViTc.

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
      token), 'map' (big_vision's multi-head attention pooling, no class
      token), 'unpooled' (head on every token), 'token_unpooled' (class token
      added, head on every token).
    representation_size: width of the pre-logits Dense + tanh layer, or None.
    resnet_stages: units per stage of a hybrid's ResNet, None for no ResNet;
      () keeps only its root (conv, GroupNorm, max-pool: stride 4).
    resnet_width: the hybrid ResNet's width factor.
    conv_stem: (features, stride) of each 3x3 conv of a ViTc stem, None for
      the patchify stem.
    head_bias_init: initial head bias (-10 for sigmoid pretraining).
    dtype: compute dtype name, 'float32' or 'bfloat16'.
    attention: the attention implementation, one of
      `attention.IMPLEMENTATIONS` ('auto', 'xla', 'cudnn', 'product',
      'onednn').
    matmul: who runs the encoder's dense products, one of `common.MATMULS`
      ('auto', 'xla', 'mkl', 'onednn', 'mixed'; see
      `common.resolve_matmul`).
    patch_embedding: how the patch embedding runs, one of
      `patch_embedding.IMPLEMENTATIONS` ('auto': a product on CPUs, a
      convolution elsewhere; 'conv'; 'product'): the same parameters and
      results up to the order of the float32 sums.
    gelu_approximate: the MLPs' GELU is the tanh approximation (True, as the
      published JAX weights were trained) or the exact erf form (False, as
      timm's and Hugging Face's).
    posemb: 'learn' (learned, one row per token, the class token's
      included) or 'sincos2d' (fixed 2-D sin-cos, not a parameter; a class
      token gets none, as in big_vision).
    layer_norm_eps: epsilon of every LayerNorm of the encoder and MAP head
      (1e-6 as in the published JAX code and timm; Hugging Face's ViT uses
      1e-12).
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
  attention: str = 'auto'
  matmul: str = 'auto'
  patch_embedding: str = 'auto'
  gelu_approximate: bool = True
  posemb: str = 'learn'
  layer_norm_eps: float = 1e-6
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
    if self.posemb not in POSEMBS:
      raise ValueError(f'Unknown posemb {self.posemb!r}; use one of {POSEMBS}.')

  def resolved_attention(self) -> tuple[str, str]:
    """(implementation, why) of `attention.resolve_implementation` here."""
    return attention.resolve_implementation(
      self.attention,
      common.compute_dtype(self.dtype),
      self.hidden_size // self.num_heads,
    )

  def _attention(self) -> str:
    """The attention implementation, resolved (and logged) once per trace."""
    implementation, why = self.resolved_attention()
    logging.info(
      'ViT attention (attention=%r): %s (%s).',
      self.attention,
      implementation,
      why,
    )
    return implementation

  def _log_matmul(self) -> None:
    """Logs who runs the dense products (resolved again where they run)."""
    implementation, why = common.resolve_matmul(self.matmul, self.dtype)
    logging.info(
      'ViT dense products (matmul=%r): %s (%s).',
      self.matmul,
      implementation,
      why,
    )

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
    """Images (B, H, W, 3) in [-1, 1] -> patch tokens (B, N, D), and the
    (rows, columns) of the patch grid."""
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
    x = PatchEmbedding(
      self.hidden_size,
      self.patch_size,
      dtype=self.dtype,
      kernel_init=common.partitioned(
        kernel_init, (*resnet.CONV_AXES[:3], 'embed')
      ),
      implementation=self.patch_embedding,
      name='embedding',
    )(x)
    batch, height, width, channels = x.shape
    return jnp.reshape(x, (batch, height * width, channels)), (height, width)

  def _pool(self, x, implementation):
    if self.classifier == 'token':
      return x[:, 0]
    if self.classifier == 'gap':
      return jnp.mean(x, axis=1)
    if self.classifier == 'map':
      return MAPHead(
        mlp_dim=self.mlp_dim,
        num_heads=self.num_heads,
        dtype=self.dtype,
        attention=implementation,
        matmul=self.matmul,
        gelu_approximate=self.gelu_approximate,
        layer_norm_eps=self.layer_norm_eps,
        name='MAPHead_0',
      )(x)
    return x  # 'unpooled', 'token_unpooled'

  def _encode(self, tokens, grid, train, implementation):
    """Patch tokens (B, N, D) -> encoder output (B, N [+1], D), float32.

    Adds a fixed position embedding (`posemb='sincos2d'`) on the (rows,
    columns) `grid`, prepends the class token (token classifiers) and runs
    the encoder, which adds a learned position embedding (`posemb='learn'`).
    """
    x = tokens.astype(jnp.float32)
    if self.posemb == 'sincos2d':
      x = x + posemb_sincos_2d(*grid, self.hidden_size)
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
      attention=implementation,
      matmul=self.matmul,
      gelu_approximate=self.gelu_approximate,
      learned_posemb=self.posemb == 'learn',
      layer_norm_eps=self.layer_norm_eps,
      name='Transformer',
    )(x, train=train)

  def _head(self, x, implementation):
    """Encoder output -> pooled pre-logits features -> logits.

    Pooling and head are cheap and run in float32 (the encoder's output
    dtype), so that the logits are not rounded to the compute dtype; the MAP
    head's products take the compute dtype as an encoder block's do.
    """
    x = self._pool(x, implementation)
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
    return common.head(self.num_classes, self.head_bias_init)(x)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check()
    implementation = self._attention()
    self._log_matmul()
    tokens, grid = self._tokens(images, train)
    x = self._encode(tokens, grid, train, implementation)
    return self._head(x, implementation)

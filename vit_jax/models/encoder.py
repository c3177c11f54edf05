"""The Transformer encoder of the ViT and its MAP pooling head.

Module and parameter names follow the published checkpoints, including the
global numbering inside a block (LayerNorm_0, MultiHeadDotProductAttention_1,
LayerNorm_2, MlpBlock_3), and big_vision's for the MAP head (`MAPHead_0/
{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}`).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import bias_gradients, common
from vit_jax.models.attention import MultiHeadDotProductAttention
from vit_jax.models.layer_norm import LayerNorm

LN_EPS = 1e-6

xavier_uniform = nn.initializers.xavier_uniform()


def layer_norm(dtype, name, epsilon=LN_EPS):
  return LayerNorm(epsilon=epsilon, dtype=dtype, name=name)


def posemb_sincos_2d(
  height: int, width: int, features: int, temperature: float = 10_000.0
) -> jnp.ndarray:
  """Fixed 2-D sin-cos position embedding (1, height * width, features).

  big_vision's `posemb_sincos_2d` (after MoCo v3): with x the column and y
  the row of a token (row-major order) and w_k = temperature^(-k / (F/4 - 1))
  for k < F/4, the features are [sin(x w), cos(x w), sin(y w), cos(y w)].
  """
  if features % 4:
    raise ValueError(
      f"posemb='sincos2d' needs a hidden size divisible by 4, not {features}."
    )
  y, x = jnp.mgrid[:height, :width]
  quarter = features // 4
  omega = 1.0 / temperature ** (jnp.arange(quarter) / (quarter - 1))
  x = x.reshape(-1, 1) * omega
  y = y.reshape(-1, 1) * omega
  embedding = [jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)]
  return jnp.concatenate(embedding, axis=1)[None].astype(jnp.float32)


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
    return bias_gradients.add(x, pos_embedding)


def gelu_recomputed(x, approximate: bool):
  """GELU whose backward pass recomputes it from x rather than keeping it.

  Autodiff of the GELU keeps its tanh (or erf) of x, a float32 (batch,
  tokens, mlp_dim) array, for the backward pass, next to x itself, which
  that pass reads anyway. Recomputing it gives the same gradients to the
  bit with one such array less to write and read back per layer (ViT-B/16
  bfloat16 training on a CPU: 1.03-1.05x faster on glibc's malloc, peak
  host memory 5.00 against 5.82 GiB at batch 32).
  """
  gelu = functools.partial(nn.gelu, approximate=approximate)
  return jax.checkpoint(gelu)(x)


class MlpBlock(nn.Module):
  """Dense(D->M) -> GELU -> Dense(M->D), with dropout.

  `gelu_approximate` picks the tanh approximation of GELU (the published
  JAX weights were trained with it) or the exact erf form (timm, Hugging
  Face).
  """

  mlp_dim: int
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: str = 'float32'
  gelu_approximate: bool = True
  matmul: str = 'auto'

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
      dot_general=common.dot_general(dtype, jnp.float32, self.matmul),
      kernel_init=common.partitioned(xavier_uniform, ('embed', 'mlp')),
      bias_init=common.partitioned(nn.initializers.normal(1e-6), ('mlp',)),
      name='Dense_0',
    )(x)
    x = common.constrain(x, ('batch', 'length', 'act_mlp'))
    x = gelu_recomputed(x, self.gelu_approximate).astype(dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=self.deterministic)
    x = nn.Dense(
      features,
      dtype=None,
      # Added to the float32 residual stream: no rounding to `dtype`.
      dot_general=common.dot_general(dtype, jnp.float32, self.matmul),
      kernel_init=common.partitioned(xavier_uniform, ('mlp', 'embed')),
      bias_init=common.partitioned(nn.initializers.normal(1e-6), ('embed',)),
      name='Dense_1',
    )(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=self.deterministic)


class EncoderBlock(nn.Module):
  """Pre-LN Transformer block: equations (2) and (3), on a float32 stream."""

  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: str = 'float32'
  attention: str = 'auto'
  matmul: str = 'auto'
  gelu_approximate: bool = True
  layer_norm_eps: float = LN_EPS

  @nn.compact
  def __call__(self, x):
    dtype = common.compute_dtype(self.dtype)
    y = layer_norm(dtype, 'LayerNorm_0', self.layer_norm_eps)(x)
    y = MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dropout_rate=self.attention_dropout_rate,
      deterministic=self.deterministic,
      dtype=self.dtype,
      implementation=self.attention,
      matmul=self.matmul,
      name='MultiHeadDotProductAttention_1',
    )(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
    x = x + y.astype(jnp.float32)
    y = layer_norm(dtype, 'LayerNorm_2', self.layer_norm_eps)(x)
    y = MlpBlock(
      mlp_dim=self.mlp_dim,
      dropout_rate=self.dropout_rate,
      deterministic=self.deterministic,
      dtype=self.dtype,
      gelu_approximate=self.gelu_approximate,
      matmul=self.matmul,
      name='MlpBlock_3',
    )(y)
    x = x + y.astype(jnp.float32)
    return common.constrain(x, ('batch', 'length', 'act_embed'))


def _scan_body(block, carry, _):
  return block(carry), None


class Encoder(nn.Module):
  """Learned position embedding, `num_layers` blocks and the final LayerNorm.

  With `scan`, the blocks are one `nn.scan` over stacked parameters
  (`encoderblock/...` with a leading layer axis): compile time no longer
  grows with depth. `remat_policy` rematerialises each block. Without
  `learned_posemb` the caller adds a fixed position embedding itself.
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: str = 'float32'
  scan: bool = False
  remat_policy: str = 'none'
  attention: str = 'auto'
  matmul: str = 'auto'
  gelu_approximate: bool = True
  learned_posemb: bool = True
  layer_norm_eps: float = LN_EPS

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    # The residual stream stays float32 whatever the compute dtype (as under
    # torch autocast): each block reads it through a LayerNorm that rounds to
    # the compute dtype, and adds its output back in float32. This halves the
    # bfloat16 error of the logits at little cost.
    x = x.astype(jnp.float32)
    if self.learned_posemb:
      x = AddPositionEmbs(name='posembed_input')(x)
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
      attention=self.attention,
      matmul=self.matmul,
      gelu_approximate=self.gelu_approximate,
      layer_norm_eps=self.layer_norm_eps,
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
    return layer_norm(jnp.float32, 'encoder_norm', self.layer_norm_eps)(x)


class MAPHead(nn.Module):
  """Multi-head attention pooling (big_vision's `MAPHead`).

  A learned probe attends to the encoder's output tokens; then
  x + MlpBlock(LayerNorm(x)) at the probe is the pooled feature. The
  attention and MLP run in the compute dtype like an encoder block's, on the
  float32 encoder output.
  """

  mlp_dim: int
  num_heads: int
  dtype: str = 'float32'
  attention: str = 'auto'
  matmul: str = 'auto'
  gelu_approximate: bool = True
  layer_norm_eps: float = LN_EPS

  @nn.compact
  def __call__(self, x):
    batch, _, features = x.shape
    probe = self.param(
      'probe',
      common.partitioned(xavier_uniform, (None, None, 'embed')),
      (1, 1, features),
    )
    probe = jnp.broadcast_to(probe, (batch, 1, features))
    x = MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      implementation=self.attention,
      matmul=self.matmul,
      name='MultiHeadDotProductAttention_0',
    )(probe, x)
    y = layer_norm(
      common.compute_dtype(self.dtype), 'LayerNorm_0', self.layer_norm_eps
    )(x)
    y = MlpBlock(
      mlp_dim=self.mlp_dim,
      dtype=self.dtype,
      gelu_approximate=self.gelu_approximate,
      matmul=self.matmul,
      name='MlpBlock_0',
    )(y)
    return (x + y.astype(jnp.float32))[:, 0]

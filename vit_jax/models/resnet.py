"""ResNets with weight-standardised convolutions and GroupNorm.

Two variants, each named as its published checkpoints are:
- the post-activation ResNet root of the R50+ViT hybrids (`hybrid_root`,
  Dosovitskiy et al.), whose parameters sit at the top level of the ViT
  (`conv_root`, `gn_root`, `block{s}/unit{u}/...`);
- the pre-activation ResNetV2 of BiT (Kolesnikov et al.), the paper's
  "ResNet (BiT)" baselines (`BiTResNet`: `root_block`, `block{s}/unit{uu}/
  {a,b,c}`, `group_norm`, `head`).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import common

CONV_AXES = ('conv_height', 'conv_width', 'conv_in', 'conv_out')
GROUPS = 32


def weight_standardize(
  w: jax.Array, eps: float, eps_in_sqrt: bool
) -> jax.Array:
  """Standardises a conv kernel over its (height, width, input) axes."""
  w = w - jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  if eps_in_sqrt:
    var = jnp.mean(jnp.square(w), axis=(0, 1, 2), keepdims=True)
    return w * jax.lax.rsqrt(var + eps)
  return w / (jnp.std(w, axis=(0, 1, 2), keepdims=True) + eps)


class StdConv(nn.Conv):
  """Conv whose kernel is weight-standardised on every use.

  The hybrids' published code divides by (std + 1e-5); BiT divides by
  sqrt(var + eps). Both are kept so that published weights give published
  outputs.
  """

  standardize_eps: float = 1e-5
  eps_in_sqrt: bool = False

  def param(self, name, *args, **kwargs):
    param = super().param(name, *args, **kwargs)
    if name == 'kernel':
      param = weight_standardize(param, self.standardize_eps, self.eps_in_sqrt)
    return param


def _std_conv(
  features, kernel, strides=1, padding='SAME', *, dtype, name, **kwargs
):
  return StdConv(
    features=features,
    kernel_size=(kernel, kernel),
    strides=(strides, strides),
    padding=padding,
    use_bias=False,
    dtype=dtype,
    conv_general_dilated=common.conv_general_dilated(dtype),
    kernel_init=common.partitioned(nn.initializers.lecun_normal(), CONV_AXES),
    name=name,
    **kwargs,
  )


def _group_norm(*, dtype, name, epsilon=1e-6, zero_scale=False):
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.GroupNorm(
    num_groups=GROUPS,
    epsilon=epsilon,
    dtype=dtype,
    scale_init=common.partitioned(scale_init, ('conv_out',)),
    bias_init=common.partitioned(nn.initializers.zeros, ('conv_out',)),
    name=name,
  )


# ----------------------------------------------------------------------------
# The hybrids' ResNet (post-activation bottlenecks).


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1, relu(residual + y)."""

  features: int
  strides: int = 1
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    dtype = common.compute_dtype(self.dtype)
    out = self.features * 4
    residual = x
    if x.shape[-1] != out or self.strides != 1:
      residual = _std_conv(out, 1, self.strides, dtype=dtype, name='conv_proj')(
        residual
      )
      residual = _group_norm(dtype=dtype, name='gn_proj')(residual)
    y = _std_conv(self.features, 1, dtype=dtype, name='conv1')(x)
    y = nn.relu(_group_norm(dtype=dtype, name='gn1')(y))
    y = _std_conv(self.features, 3, self.strides, dtype=dtype, name='conv2')(y)
    y = nn.relu(_group_norm(dtype=dtype, name='gn2')(y))
    y = _std_conv(out, 1, dtype=dtype, name='conv3')(y)
    # A zero-initialised last norm makes every unit start as the identity.
    y = _group_norm(dtype=dtype, name='gn3', zero_scale=True)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` residual units; the first carries the stride."""

  block_size: int
  features: int
  first_stride: int
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    for i in range(self.block_size):
      x = ResidualUnit(
        self.features,
        strides=self.first_stride if i == 0 else 1,
        dtype=self.dtype,
        name=f'unit{i + 1}',
      )(x)
      x = common.constrain(x, ('batch', None, None, 'act_conv'))
    return x


def hybrid_root(
  x: jax.Array, stage_sizes: Sequence[int], width_factor: float, dtype: str
) -> jax.Array:
  """The hybrids' ResNet, called inside the ViT so its names sit at top level.

  Stride 4 from the root, then 2 per stage after the first: (3, 4, 9) gives
  a /16 feature map, (3, 4, 6, 3) a /32 one.
  """
  compute = common.compute_dtype(dtype)
  width = int(64 * width_factor)
  x = _std_conv(width, 7, 2, dtype=compute, name='conv_root')(x)
  x = nn.relu(_group_norm(dtype=compute, name='gn_root')(x))
  x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
  for i, size in enumerate(stage_sizes):
    x = ResNetStage(
      block_size=size,
      features=width * 2**i,
      first_stride=1 if i == 0 else 2,
      dtype=dtype,
      name=f'block{i + 1}',
    )(x)
  return x


# ----------------------------------------------------------------------------
# BiT ResNetV2 (pre-activation bottlenecks).

# BiT standardises with sqrt(var + eps) and uses GroupNorm eps 1e-5 (as the
# BiT authors' TF2 release and timm's `resnetv2_*_bit` do).
_BIT_WS_EPS = 1e-8
_BIT_GN_EPS = 1e-5


def _bit_conv(features, kernel, strides, *, dtype, name):
  pad = (kernel - 1) // 2  # BiT pads symmetrically, unlike TF 'SAME'.
  return _std_conv(
    features,
    kernel,
    strides,
    padding=((pad, pad), (pad, pad)),
    dtype=dtype,
    name=name,
    standardize_eps=_BIT_WS_EPS,
    eps_in_sqrt=True,
  )


class _Projection(nn.Module):
  """The shortcut's strided 1x1 conv (`a/proj/standardized_conv2d`)."""

  features: int
  strides: int
  dtype: str

  @nn.compact
  def __call__(self, x):
    return _bit_conv(
      self.features,
      1,
      self.strides,
      dtype=common.compute_dtype(self.dtype),
      name='standardized_conv2d',
    )(x)


class _NormActConv(nn.Module):
  """GroupNorm -> ReLU -> conv; optionally the shortcut of the unit.

  The projection reads the pre-activated input, as in ResNetV2; it lives
  inside sub-unit 'a' because that is where BiT's checkpoints keep it.
  """

  features: int
  kernel: int
  strides: int = 1
  projection: int | None = None
  projection_strides: int = 1
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    dtype = common.compute_dtype(self.dtype)
    x = _group_norm(dtype=dtype, epsilon=_BIT_GN_EPS, name='group_norm')(x)
    x = nn.relu(x)
    shortcut = None
    if self.projection is not None:
      shortcut = _Projection(
        self.projection, self.projection_strides, self.dtype, name='proj'
      )(x)
    y = _bit_conv(
      self.features,
      self.kernel,
      self.strides,
      dtype=dtype,
      name='standardized_conv2d',
    )(x)
    return y, shortcut


class PreActBottleneck(nn.Module):
  """ResNetV2 unit: three pre-activated convs plus the (projected) input."""

  features: int
  strides: int = 1
  project: bool = False
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    out = 4 * self.features
    y, shortcut = _NormActConv(
      self.features,
      1,
      projection=out if self.project else None,
      projection_strides=self.strides,
      dtype=self.dtype,
      name='a',
    )(x)
    y, _ = _NormActConv(
      self.features, 3, self.strides, dtype=self.dtype, name='b'
    )(y)
    y, _ = _NormActConv(out, 1, dtype=self.dtype, name='c')(y)
    return y + (x if shortcut is None else shortcut)


class _BiTStage(nn.Module):
  block_size: int
  features: int
  first_stride: int
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    for i in range(self.block_size):
      x = PreActBottleneck(
        self.features,
        strides=self.first_stride if i == 0 else 1,
        project=i == 0,
        dtype=self.dtype,
        name=f'unit{i + 1:02d}',
      )(x)
      x = common.constrain(x, ('batch', None, None, 'act_conv'))
    return x


class _BiTRoot(nn.Module):
  width: int
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    x = _bit_conv(
      self.width,
      7,
      2,
      dtype=common.compute_dtype(self.dtype),
      name='standardized_conv2d',
    )(x)
    # BiT pads the max-pool with zeros, not -inf.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class BiTResNet(nn.Module):
  """BiT ResNetV2-{depth}x{width_factor} classifier.

  Attributes:
    num_classes: output classes; None or 0 returns the pooled features.
    stage_sizes: units per stage, e.g. (3, 4, 6, 3) for R50.
    width_factor: multiplies every stage's width (64, 128, 256, 512).
    head_bias_init: initial head bias (-10 for sigmoid pretraining).
    dtype: compute dtype name.
  """

  num_classes: int | None
  stage_sizes: Sequence[int]
  width_factor: int = 1
  head_bias_init: float = 0.0
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # No dropout or batch statistics in BiT.
    dtype = common.compute_dtype(self.dtype)
    x = images.astype(dtype)
    x = common.constrain(x, ('batch', None, None, None))
    width = 64 * self.width_factor
    x = _BiTRoot(width, self.dtype, name='root_block')(x)
    for i, size in enumerate(self.stage_sizes):
      x = _BiTStage(
        size, width * 2**i, 1 if i == 0 else 2, self.dtype, name=f'block{i + 1}'
      )(x)
    x = _group_norm(dtype=dtype, epsilon=_BIT_GN_EPS, name='group_norm')(x)
    x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    if not self.num_classes:
      return x.astype(jnp.float32)
    x = common.head(
      self.num_classes,
      self.head_bias_init,
      dtype=dtype,
      dot_general=common.dot_general(dtype),
    )(x)
    return x.astype(jnp.float32)

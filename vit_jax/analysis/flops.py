"""Compute accounting: forward FLOPs and parameter counts.

Counting convention (the paper's):
- Only multiply-adds of matrix products and convolutions are counted, and a
  multiply-add is 2 FLOPs. Normalisations, activations, softmax, pooling,
  bias and residual additions are left out (under 1% of a ViT's forward
  pass, 1-2% of a ResNet's).
- A convolution costs c_in * c_out multiply-adds per kernel tap that lands
  inside the input, summed over output positions. Taps on the zero padding
  are not counted (`count_padding=True` counts them, which is the usual
  dense count of CNN papers). This is what XLA's cost analysis counts, and
  it is the convention that reproduces the paper's ResNet rows: with the
  dense count every BiT row comes out 3.5-5% above the paper, with this one
  within 1.5% (3x3 convs on 7x7 maps lose a fifth of their taps to padding).
  Patchify and 1x1 convs have no padding, so ViT counts do not depend on it.
- A Transformer block over T tokens of width D with MLP width M costs
  4TD² (query, key, value, output projections) + 2T²D (scores q·kᵀ and the
  weighted sum of values) + 2TDM (MLP) multiply-adds.
- Pretraining costs 3 forward passes per image (forward + backward, the
  backward pass being about twice the forward).

The pretraining cost of the paper's table is `compute_table`.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import (
  get_model,
  resnet,
  vit,
)

ImageSize = int | tuple[int, int]

# Forward + backward, the backward pass costing about two forward passes.
TRAINING_FLOPS_PER_FORWARD = 3


def _height_width(image_size: ImageSize) -> tuple[int, int]:
  if isinstance(image_size, int):
    return image_size, image_size
  height, width = image_size
  return int(height), int(width)


def _taps(size: int, kernel: int, stride: int, pad_before: int, out: int):
  """Kernel taps, summed over outputs, that land inside the input (1-D)."""
  taps = 0
  for o in range(out):
    first = o * stride - pad_before
    taps += max(min(first + kernel, size) - max(first, 0), 0)
  return taps


@dataclasses.dataclass
class _ConvCounter:
  """Sums the multiply-adds of convolutions padded to ceil(size / stride).

  Attributes:
    count_padding: count the taps on zero padding too (the dense count).
      Without it only taps inside the input count, as XLA's cost analysis
      does.
    tf_same: pad as TF 'SAME' (the extra row/column of an odd total
      padding after the input), else (k - 1) / 2 on both sides (BiT, ViTc);
      the two differ only in which taps fall on padding.
    macs: the running total.
  """

  count_padding: bool
  tf_same: bool = False
  macs: int = 0

  def __call__(self, height, width, kernel, c_in, c_out, stride=1):
    """Adds one conv; returns its output height and width."""
    taps = 1
    out = []
    for size in (height, width):
      out_size = -(-size // stride)
      if self.tf_same:
        pad = max((out_size - 1) * stride + kernel - size, 0) // 2
      else:
        pad = (kernel - 1) // 2
      if self.count_padding:
        taps *= out_size * kernel
      else:
        taps *= _taps(size, kernel, stride, pad, out_size)
      out.append(out_size)
    self.macs += taps * c_in * c_out
    return tuple(out)


def _resnet(conv: _ConvCounter, height, width, stage_sizes, base_width):
  """Root and bottleneck stages of a ResNet (post- or pre-activation alike).

  The root is a 7x7/2 conv then a 3x3/2 max-pool (no multiply-adds). Stage
  i has width base_width * 2^i and outputs 4x that; its first unit carries
  the stride (1 in the first stage, else 2) on the 3x3 conv and on a 1x1
  projection shortcut. Returns the output height, width and channels.
  """
  height, width = conv(height, width, 7, 3, base_width, 2)
  height, width = -(-height // 2), -(-width // 2)
  channels = base_width
  for i, size in enumerate(stage_sizes):
    features = base_width * 2**i
    for unit in range(size):
      stride = (1 if i == 0 else 2) if unit == 0 else 1
      if unit == 0:
        conv(height, width, 1, channels, 4 * features, stride)
      conv(height, width, 1, channels, features)
      height, width = conv(height, width, 3, features, features, stride)
      conv(height, width, 1, features, 4 * features)
      channels = 4 * features
  return height, width, channels


def _bit_macs(module: resnet.BiTResNet, height, width, count_padding) -> int:
  conv = _ConvCounter(count_padding)
  *_, channels = _resnet(
    conv, height, width, module.stage_sizes, 64 * module.width_factor
  )
  head = channels * module.num_classes if module.num_classes else 0
  return conv.macs + head


def _vit_stem(module: vit.VisionTransformer, height, width, count_padding):
  """Multiply-adds of the stem, and the number of tokens it makes."""
  conv = _ConvCounter(count_padding, tf_same=module.resnet_stages is not None)
  channels = 3
  if module.resnet_stages is not None:
    height, width, channels = _resnet(
      conv,
      height,
      width,
      module.resnet_stages,
      int(64 * module.resnet_width),
    )
  elif module.conv_stem is not None:
    for features, stride in module.conv_stem:
      height, width = conv(height, width, 3, channels, features, stride)
      channels = features
  patch = module.patch_size
  if height % patch or width % patch:
    raise ValueError(
      f'The {height}x{width} input of the embedding is not a multiple of the '
      f'patch size {patch}; choose an image size divisible by it.'
    )
  grid = (height // patch) * (width // patch)
  return conv.macs + grid * patch * patch * channels * module.hidden_size, grid


def encoder_block_macs(tokens: int, hidden: int, mlp: int) -> int:
  """Multiply-adds of one Transformer block: 4TD² + 2T²D + 2TDM."""
  return (
    4 * tokens * hidden**2 + 2 * tokens**2 * hidden + 2 * tokens * hidden * mlp
  )


def _vit_macs(module: vit.VisionTransformer, height, width, count_padding):
  macs, tokens = _vit_stem(module, height, width, count_padding)
  if module.classifier in ('token', 'token_unpooled'):
    tokens += 1
  macs += module.num_layers * encoder_block_macs(
    tokens, module.hidden_size, module.mlp_dim
  )
  # The unpooled classifiers apply the head (and pre-logits) to every token.
  pooled = 1 if module.classifier in ('token', 'gap') else tokens
  features = module.hidden_size
  if module.representation_size:
    macs += pooled * features * module.representation_size
    features = module.representation_size
  if module.num_classes:
    macs += pooled * features * module.num_classes
  return macs


def forward_flops(
  model_name: str,
  image_size: ImageSize = 224,
  num_classes: int | None = 1000,
  *,
  count_padding: bool = False,
  **overrides,
) -> int:
  """Analytic forward FLOPs per image (2 per multiply-add).

  Args:
    model_name: a registry name (`vit_jax.models.list_models()`).
    image_size: side of a square image, or (height, width).
    num_classes: head size; None or 0 counts the model without a head.
    count_padding: also count conv taps on zero padding (the usual dense
      count of CNN papers). Off by default, which matches XLA and the
      paper's ResNet rows (see the module docstring).
    **overrides: module attributes as for `get_model` (e.g.
      `classifier='gap'`, `representation_size=768`).

  Returns:
    FLOPs of one forward pass of one image, counting matrix products and
    convolutions only (see the module docstring).
  """
  module = get_model(model_name, num_classes, **overrides)
  height, width = _height_width(image_size)
  if isinstance(module, resnet.BiTResNet):
    return 2 * _bit_macs(module, height, width, count_padding)
  return 2 * _vit_macs(module, height, width, count_padding)


def _abstract_variables(module: nn.Module, height: int, width: int):
  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), images)


def xla_forward_flops(
  model_name: str,
  image_size: ImageSize = 224,
  num_classes: int | None = 1000,
  **overrides,
) -> float:
  """FLOPs per image of a compiled forward pass, by XLA's cost analysis.

  The forward pass is lowered and compiled (never run) for batches of one
  and two images, and the difference is returned: the cost of one more
  image. Work done once per batch is left out that way, notably the weight
  standardisation of every ResNet kernel (about 0.15 GFLOPs for an R50,
  which is 8% of its forward pass at 96x96). XLA counts every operation
  (normalisations and activations too) and, like `forward_flops`, only the
  conv taps inside the input.
  """
  module = get_model(model_name, num_classes, **overrides)
  height, width = _height_width(image_size)
  variables = _abstract_variables(module, height, width)
  apply = jax.jit(module.apply)
  flops = []
  for batch in (1, 2):
    images = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
    compiled = apply.lower(variables, images).compile()
    flops.append(compiled.cost_analysis()['flops'])
  return float(flops[1] - flops[0])


def param_count(
  model_name: str,
  image_size: ImageSize = 224,
  num_classes: int | None = 1000,
  **overrides,
) -> int:
  """Number of trainable parameters, from shapes only (nothing allocated).

  BatchNorm statistics (ViTc stems) are state, not parameters, and are not
  counted. The image size matters through the position embedding.
  """
  module = get_model(model_name, num_classes, **overrides)
  if getattr(module, 'scan', True) is False:
    # Scanned blocks hold the same parameters, stacked; tracing one block
    # instead of all of them makes the count several times faster.
    module = module.clone(scan=True)
  variables = _abstract_variables(module, *_height_width(image_size))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(variables['params']))

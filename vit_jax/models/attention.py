"""Multi-head dot-product attention and the kernels that compute it.

One function, softmax(q k^T / sqrt(Dh)) v, has five implementations, chosen
by the model's `attention` option (see `resolve_implementation`):
  'xla'      jax.nn.dot_product_attention(implementation='xla'): XLA's
             attention, on any backend;
  'cudnn'    jax.nn.dot_product_attention(implementation='cudnn'): cuDNN's
             fused (flash) attention, on NVIDIA GPUs, bfloat16 only (odd
             sequence lengths padded: `even_length_attention`);
  'product'  `product_attention`, six matmuls in the compute dtype with
             float32 accumulation and a custom VJP;
  'onednn'   `vit_jax.kernels.onednn.attention`: the same roundings as
             'product', computed by oneDNN for one (image, head) and block
             of queries at a time, whose logits stay in the cache: CPUs
             only;
  'auto'     'cudnn' where it can run, else 'onednn' on a single CPU device
             where oneDNN can run, else 'product' for bfloat16 on CPUs, else
             'xla'.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp

from vit_jax.kernels import onednn
from vit_jax.models import common

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'product', 'onednn')

# cuDNN's fused attention needs an Ampere or newer GPU, a 16-bit dtype and a
# head dimension that is a multiple of 8, at most 128 before Hopper (whose
# backward pass allows 256): NVIDIA's cuDNN support matrix and the checks of
# jax._src.cudnn.fused_attention_stablehlo.
_CUDNN_MIN_CAPABILITY = (8, 0)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)

xavier_uniform = nn.initializers.xavier_uniform()


def attention_weights(query: jax.Array, key: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) in float32, shape (batch, heads, q, k)."""
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum(
    'bqhd,bkhd->bhqk', query, key, preferred_element_type=jnp.float32
  )
  return jax.nn.softmax(logits * scale, axis=-1)


def _attention_dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


# XLA:CPU computes attention's float32 (batch, heads, queries, keys) logits
# in one piece; past a few tens of MB (ViT-B/16 at 384 px, batch 8: 128 MB)
# that ran about 1.5x slower than independent chunks of the batch of at
# most this size each (docs/performance-cpu.md).
_CHUNK_LOGITS_BYTES = 32 * 2**20


def batch_chunks(
  batch: int, heads: int, queries: int, keys: int
) -> list[tuple[int, int]]:
  """The [start, end) ranges of the batch that `product_attention` splits.

  One range (the whole batch) while the float32 logits take at most
  `_CHUNK_LOGITS_BYTES`, and always with several devices, whose batch XLA
  partitions itself; otherwise chunks of as many images as fit it (at least
  one).
  """
  per_image = heads * queries * keys * 4
  size = max(1, _CHUNK_LOGITS_BYTES // per_image)
  if size >= batch or jax.device_count() > 1:
    return [(0, batch)]
  return [(start, min(start + size, batch)) for start in range(0, batch, size)]


def even_length_attention(
  query: jax.Array, key: jax.Array, value: jax.Array, implementation: str
) -> jax.Array:
  """`jax.nn.dot_product_attention` on sequences padded to even lengths.

  JAX's cuDNN attention refuses odd sequence lengths once it is
  differentiated ("Unsupported sequence length Q 197, KV 197", JAX 0.10:
  `check_is_flash_attention` takes the absent bias for a bias, whose
  gradient needs even lengths), and a ViT's sequences are odd: 196 patches
  and the class token at 224 px, 577 tokens at 384, the MAP head's single
  probe. An odd query sequence gets one more row, dropped from the output;
  an odd key sequence one more key, which the keys' padding mask
  (`key_value_seq_lengths`) hides. Even lengths pass unchanged.

  Args:
    query: (batch, queries, heads, head_dim).
    key: (batch, keys, heads, head_dim).
    value: like `key`.
    implementation: `jax.nn.dot_product_attention`'s ('cudnn'; 'xla' gives
      the same function anywhere, for tests).

  Returns:
    softmax(q k^T / sqrt(head_dim)) v, shaped like `query`.
  """

  def pad(x):
    return jnp.pad(x, [(0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)])

  keys = key.shape[1]
  key_lengths = None
  if keys % 2:
    key_lengths = jnp.full((key.shape[0],), keys, jnp.int32)
  out = jax.nn.dot_product_attention(
    pad(query),
    pad(key),
    pad(value),
    key_value_seq_lengths=key_lengths,
    implementation=implementation,
  )
  return out[:, : query.shape[1]]


def _chunk(x: jax.Array, start: int, end: int) -> jax.Array:
  return x if (start, end) == (0, x.shape[0]) else x[start:end]


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
  products of `common.mixed_dot_general`. Long sequences are computed for
  chunks of the batch apart (`batch_chunks`).
  """
  return _product_attention_fwd(query, key, value)[0]


def _chunks(query, key):
  batch, queries, heads, _ = query.shape
  return batch_chunks(batch, heads, queries, key.shape[1])


def _product_attention_fwd(query, key, value):
  scale = query.shape[-1] ** -0.5
  outs, weights = [], []
  for start, end in _chunks(query, key):
    logits = _attention_dot(
      'bqhd,bkhd->bhqk',
      _chunk(query, start, end),
      _chunk(key, start, end),
    )
    weights.append(jax.nn.softmax(logits * scale, axis=-1).astype(query.dtype))
    out = _attention_dot(
      'bhqk,bkhd->bqhd', weights[-1], _chunk(value, start, end)
    )
    outs.append(out.astype(query.dtype))
  out = jnp.concatenate(outs)
  return out, (query, key, value, weights, out)


def _product_attention_bwd(residuals, out_grad):
  query, key, value, weights, out = residuals
  grads = [
    _chunk_grads(
      *(_chunk(x, start, end) for x in (query, key, value)),
      chunk_weights,
      *(_chunk(x, start, end) for x in (out, out_grad)),
    )
    for (start, end), chunk_weights in zip(
      _chunks(query, key), weights, strict=True
    )
  ]
  return tuple(jnp.concatenate(parts) for parts in zip(*grads, strict=True))


def _chunk_grads(query, key, value, weights, out, out_grad):
  """The gradients of query, key and value (one chunk of the batch)."""
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
  """Whether 'auto' picks `product_attention` (when cuDNN cannot run).

  Only for bfloat16 compute on CPUs (XLA:CPU), where
  `jax.nn.dot_product_attention` runs as float32 matmuls (see
  `product_attention`). In float32 on XLA:CPU, XLA's attention was not
  slower than `product_attention` in a ViT-B/16 training step at 224 px.
  On a single CPU device 'auto' prefers 'onednn' to either.
  """
  return jax.default_backend() == 'cpu' and dtype == jnp.bfloat16


def nvidia_compute_capability() -> tuple[int, int] | None:
  """The first device's CUDA compute capability; None off NVIDIA GPUs."""
  device = jax.devices()[0]
  platform_version = jax.extend.backend.get_backend().platform_version
  if device.platform != 'gpu' or 'cuda' not in platform_version.lower():
    return None
  major, minor = device.compute_capability.split('.')[:2]
  return int(major), int(minor)


def cudnn_problem(
  capability: tuple[int, int] | None, dtype, head_dim: int
) -> str | None:
  """Why cuDNN's fused attention cannot run here, or None if it can.

  Args:
    capability: the GPU's CUDA compute capability, None for no NVIDIA GPU.
    dtype: the compute dtype of the attention inputs.
    head_dim: the query/key/value width of one head.
  """
  if capability is None:
    return f'it needs an NVIDIA GPU (this runs on {jax.default_backend()})'
  if capability < _CUDNN_MIN_CAPABILITY:
    return (
      f'it needs compute capability >= 8.0 (Ampere), this GPU has '
      f'{capability[0]}.{capability[1]}'
    )
  if jnp.dtype(dtype) not in _CUDNN_DTYPES:
    return f'it needs bfloat16 inputs, not {jnp.dtype(dtype).name}'
  max_head_dim = 256 if capability >= (9, 0) else 128
  if head_dim % 8 or head_dim > max_head_dim:
    return (
      f'it needs a head dimension that is a multiple of 8 and at most '
      f'{max_head_dim} on this GPU, not {head_dim}'
    )
  return None


def resolve_implementation(name: str, dtype, head_dim: int) -> tuple[str, str]:
  """The attention implementation that runs for an `attention` option.

  Args:
    name: one of `IMPLEMENTATIONS`.
    dtype: the compute dtype.
    head_dim: the width of one head (hidden size / heads).

  Returns:
    (implementation, why): 'xla', 'cudnn', 'product' or 'onednn', and the
    reason it was picked, for the log.

  Raises:
    ValueError: for an unknown name, or 'cudnn' or 'onednn' where it cannot
      run.
  """
  if name not in IMPLEMENTATIONS:
    raise ValueError(
      f'Unknown attention implementation {name!r}; use one of '
      f'{IMPLEMENTATIONS}.'
    )
  dtype = jnp.dtype(dtype)
  problem = cudnn_problem(nvidia_compute_capability(), dtype, head_dim)
  if name == 'cudnn' and problem:
    raise ValueError(
      f"attention='cudnn' (cuDNN fused attention) cannot run here: {problem}."
      " Use attention='auto' (picks what runs here) or 'xla'."
    )
  if name == 'onednn' and (
    onednn_problem := common.custom_call_problem('onednn')
  ):
    raise ValueError(
      f"attention='onednn' cannot run here: {onednn_problem} Use "
      "attention='auto' (picks what runs here) or 'xla'."
    )
  if name != 'auto':
    return name, 'set explicitly'
  if problem is None:
    return 'cudnn', f'NVIDIA GPU, {dtype.name}, head dim {head_dim}'
  # Several devices: XLA partitions attention over them itself, which it
  # cannot do for a custom call.
  devices = jax.device_count()
  no_onednn = (
    common.custom_call_problem('onednn')
    if devices == 1
    else f'{devices} devices'
  )
  if no_onednn is None:
    return 'onednn', f'{dtype.name} on one CPU device'
  if use_product_attention(dtype):
    return 'product', f'bfloat16 on CPU; oneDNN not used: {no_onednn}'
  return 'xla', f'cuDNN not used: {problem}'


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
  matmul: str = 'auto'

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
    if (
      dtype == jnp.float32
      and common.resolve_matmul(self.matmul, dtype)[0] == 'xla'
    ):
      y = jax.lax.dot_general(x, kernel, dimension_numbers)
    else:
      # The float32 kernel goes in uncast: its gradient stays float32.
      y = common.mixed_dot_general(
        x, kernel, dimension_numbers, dtype, jnp.float32, self.matmul
      )
    return (y + bias).astype(self.output_dtype or dtype)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with the published (D, H, Dh) kernels.

  Self-attention by default; given `inputs_kv`, the queries come from the
  first input and the keys and values from `inputs_kv` (the MAP head's
  probe). `implementation` is one of `IMPLEMENTATIONS`. The weights are formed
  explicitly only when they are needed, whatever the implementation: for
  attention dropout, or when the caller collects 'intermediates' (attention
  maps for inspection), in which case they are sown as 'attention_weights'.
  """

  num_heads: int
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: str = 'float32'
  implementation: str = 'auto'
  matmul: str = 'auto'

  @nn.compact
  def __call__(self, x, inputs_kv=None):
    features = x.shape[-1]
    if features % self.num_heads:
      raise ValueError(
        f'Hidden size {features} is not divisible by {self.num_heads} heads.'
      )
    inputs_kv = x if inputs_kv is None else inputs_kv
    dtype = common.compute_dtype(self.dtype)
    heads = (self.num_heads, features // self.num_heads)
    projection = functools.partial(
      HeadProjection,
      features=heads,
      num_input_dims=1,
      kernel_axes=('embed', 'heads', 'kv'),
      bias_axes=('heads', 'kv'),
      dtype=self.dtype,
      matmul=self.matmul,
    )
    head_axes = ('batch', 'length', 'act_heads', 'act_kv')
    query = common.constrain(projection(name='query')(x), head_axes)
    key = common.constrain(projection(name='key')(inputs_kv), head_axes)
    value = common.constrain(projection(name='value')(inputs_kv), head_axes)

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
    else:
      out = self._attend(query, key, value)
    out = common.constrain(out, head_axes)
    return HeadProjection(
      features=(features,),
      num_input_dims=2,
      kernel_axes=('heads', 'kv', 'embed'),
      bias_axes=('embed',),
      dtype=self.dtype,
      output_dtype='float32',
      matmul=self.matmul,
      name='out',
    )(out)

  def _attend(self, query, key, value):
    implementation, _ = resolve_implementation(
      self.implementation, query.dtype, query.shape[-1]
    )
    if implementation == 'onednn':
      return onednn.attention(query, key, value)
    if implementation == 'product':
      return product_attention(query, key, value)
    if implementation == 'cudnn':
      return even_length_attention(query, key, value, 'cudnn')
    return jax.nn.dot_product_attention(
      query, key, value, implementation=implementation
    )

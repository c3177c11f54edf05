"""Matrix products and attention run by oneDNN on CPUs: optional custom calls.

XLA:CPU runs matrix products in YNNPACK, which takes its operands in one
layout: for the products of a training step's backward pass XLA first
copies an operand transposed. oneDNN (the library under torch's CPU
matmuls) reads any strided view in place. `einsum` hands one batched matrix
product, written as a two-operand einsum, to oneDNN through
`onednn_matmul.cc`; `matmul` is its 2-D case. With it a ViT-B/16 bfloat16
training step ran about 8% faster on an AMX-BF16 CPU (the dense layers'
backward products; `matmul='mixed'`, the bfloat16 default on one CPU
device). MKL's GEMM (`vit_jax/kernels/mkl.py`) is float32's.

`attention` computes softmax(q k^T / sqrt(d)) v through
`onednn_attention.cc`, one (image, head) and block of queries at a time,
so that the float32 logits stay in the core's cache where XLA writes them
to memory and reads them back several times (128 MB per ViT-B/16 layer at
384 px, batch 8): one such layer ran 2.6x faster forward and 1.6-1.8x
faster forward and backward than the same products and softmax as separate
operations (docs/performance-cpu.md).

The calls are optional: they need oneDNN from pip (`onednn-cpu-gomp` and
`onednn-devel-cpu-gomp`, in requirements.txt and the `cpu` extra) and a C++
compiler with OpenMP. The sources are compiled on first use (about 6 s)
into `$VIT_JAX_KERNEL_CACHE` (default `~/.cache/vit_jax/kernels`), keyed by
the sources, jaxlib and oneDNN, and registered with XLA once per process.
`problem()` says why they cannot run here, or None.
"""

import ctypes
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.kernels import custom_calls

TARGET = 'vit_jax_onednn_matmul'
ATTENTION_TARGETS = ('vit_jax_onednn_attention', 'vit_jax_onednn_attention_bwd')
SOURCES = tuple(
  pathlib.Path(__file__).with_name(name)
  for name in ('onednn_matmul.cc', 'onednn_attention.cc')
)
INSTALL_HINT = 'pip install onednn-cpu-gomp onednn-devel-cpu-gomp'
_LIBRARY = 'libdnnl.so.3'
_DISTRIBUTIONS = ('onednn-cpu-gomp', 'onednn-devel-cpu-gomp')
# Files of an installation, relative to its prefix.
_HEADER = 'include/oneapi/dnnl/dnnl.hpp'
_MARKERS = (f'lib/{_LIBRARY}', _HEADER)


Unavailable = custom_calls.Unavailable


def _prefixes() -> list[pathlib.Path]:
  """Where to look for oneDNN's lib/ and include/ directories."""
  return custom_calls.search_prefixes('ONEDNN_ROOT', _DISTRIBUTIONS, _MARKERS)


def _find_onednn() -> tuple[pathlib.Path, pathlib.Path]:
  """(include directory, library file) of an installed oneDNN."""
  for prefix in _prefixes():
    header = prefix / _HEADER
    library = prefix / 'lib' / _LIBRARY
    if header.is_file() and library.is_file():
      return prefix / 'include', library
  raise Unavailable(
    f'oneDNN was not found (looked for {_HEADER} and lib/{_LIBRARY} under {", ".join(map(str, _prefixes()))}); '
    f'`{INSTALL_HINT}` installs it, or set $ONEDNN_ROOT.'
  )


def _compile(include: pathlib.Path, library: pathlib.Path) -> pathlib.Path:
  """The shared object of `SOURCES`, compiled once per source/jaxlib/oneDNN."""
  # -fopenmp: the attention's blocks run in parallel.
  return custom_calls.compile_sources(
    'onednn', SOURCES, [include], [library], flags=['-fopenmp']
  )


@functools.cache
def _register() -> None:
  """Builds, loads and registers the custom calls; raises Unavailable."""
  custom_calls.require_x86_64_linux('oneDNN')
  include, library = _find_onednn()
  shared_object = ctypes.cdll.LoadLibrary(str(_compile(include, library)))
  handlers = (
    (TARGET, shared_object.VitJaxOnednnMatmul),
    (ATTENTION_TARGETS[0], shared_object.VitJaxOnednnAttention),
    (ATTENTION_TARGETS[1], shared_object.VitJaxOnednnAttentionBackward),
  )
  for target, handler in handlers:
    jax.ffi.register_ffi_target(
      target, jax.ffi.pycapsule(handler), platform='cpu'
    )


@functools.cache
def problem() -> str | None:
  """Why the oneDNN custom calls cannot run here, or None if they can."""
  return custom_calls.problem_of(_register)


def _row_major_strides(shape) -> list[int]:
  strides = [1] * len(shape)
  for i in range(len(shape) - 2, -1, -1):
    strides[i] = strides[i + 1] * shape[i + 1]
  return strides


def _parse(spec: str, a: jax.Array, b: jax.Array):
  """The letters and sizes of a two-operand einsum oneDNN can run."""
  inputs, _, out = spec.replace(' ', '').partition('->')
  a_letters, _, b_letters = inputs.partition(',')
  if len(a_letters) != a.ndim or len(b_letters) != b.ndim:
    raise ValueError(
      f'einsum {spec!r} does not fit operands of shapes {a.shape} and '
      f'{b.shape}.'
    )
  if (
    len(set(a_letters)) != len(a_letters)
    or len(set(b_letters)) != len(b_letters)
    or len(set(out)) != len(out)
    or not set(out) <= set(a_letters) | set(b_letters)
  ):
    raise ValueError(
      f'einsum {spec!r}: each letter at most once per operand, and the '
      "result's letters from the operands."
    )
  sizes = {}
  for letters, shape in ((a_letters, a.shape), (b_letters, b.shape)):
    for letter, size in zip(letters, shape, strict=True):
      if sizes.setdefault(letter, size) != size:
        raise ValueError(
          f'einsum {spec!r}: {letter!r} has sizes {sizes[letter]} and {size} '
          f'in operands of shapes {a.shape} and {b.shape}.'
        )
  every = set(a_letters) | set(b_letters) | set(out)
  batch = [c for c in out if c in a_letters and c in b_letters]
  rows = [c for c in out if c in a_letters and c not in b_letters]
  columns = [c for c in out if c in b_letters and c not in a_letters]
  inner = [c for c in a_letters if c in b_letters and c not in out]
  if (
    len(rows) != 1
    or len(columns) != 1
    or len(inner) != 1
    or len(batch) + 3 != len(every)
  ):
    raise ValueError(
      f'einsum {spec!r} is not a batched matrix product: it needs one free '
      'letter in each operand, one contracted letter, and the rest shared by '
      'both operands and the result.'
    )
  return (
    a_letters,
    b_letters,
    out,
    sizes,
    (*batch, rows[0], inner[0], columns[0]),
  )


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """A two-operand einsum that is a batched matrix product, in oneDNN.

  Each operand has one free letter (the rows of `a`, the columns of `b`),
  the two share one contracted letter, and every other letter is a batch
  letter of both operands and of the result, in any order: e.g.
  'mk,kn->mn', 'mn,kn->mk' (a product with `b` transposed) or attention's
  'bqhd,bkhd->bhqk'. oneDNN reads every operand and writes the result
  through strides, so no operand is copied into another layout. The
  product is accumulated and returned in float32. CPU only.

  Raises:
    Unavailable: where the custom call cannot be built here.
    ValueError: for a spec that is not such a product, or operands of
      different dtypes.
  """
  custom_calls.require(problem())
  if a.dtype != b.dtype:
    raise ValueError(
      f'einsum takes operands of one dtype, got {a.dtype} and {b.dtype}.'
    )
  a_letters, b_letters, out, sizes, order = _parse(spec, a, b)
  *batch, rows, inner, columns = order

  def view(letters, shape, axes):
    strides = dict(zip(letters, _row_major_strides(shape), strict=True))
    return [strides[c] for c in axes]

  out_shape = tuple(sizes[c] for c in out)
  result = custom_calls.result_type(out_shape, jnp.float32, (a, b), 'einsum')
  call = jax.ffi.ffi_call(TARGET, result)
  return call(
    a,
    b,
    dims=np.array([sizes[c] for c in order], np.int64),
    a_strides=np.array(
      view(a_letters, a.shape, (*batch, rows, inner)), np.int64
    ),
    b_strides=np.array(
      view(b_letters, b.shape, (*batch, inner, columns)), np.int64
    ),
    out_strides=np.array(
      view(out, out_shape, (*batch, rows, columns)), np.int64
    ),
  )


def matmul(
  a: jax.Array,
  b: jax.Array,
  *,
  transpose_a: bool = False,
  transpose_b: bool = False,
) -> jax.Array:
  """op(a) @ op(b) for 2-D `a` and `b` of one dtype (bfloat16 or float32).

  op(x) is x, or x.T where `transpose_*` is set (read in place, not
  copied). The product is accumulated and returned in float32. CPU only.

  Raises:
    Unavailable: where the custom call cannot be built here.
    ValueError: for operands that are not two matrices of one such dtype
      whose contracted sizes agree.
  """
  custom_calls.matrix_product_shape(
    'onednn.matmul', a, b, transpose_a, transpose_b
  )
  a_letters = 'km' if transpose_a else 'mk'
  b_letters = 'nk' if transpose_b else 'kn'
  return einsum(f'{a_letters},{b_letters}->mn', a, b)


def _check_attention(query, key, value) -> None:
  custom_calls.require(problem())
  if query.ndim != 4 or key.shape != value.shape or key.ndim != 4:
    raise ValueError(
      'attention takes (batch, tokens, heads, head_dim) query, key and value '
      f'(key and value of one shape), got {query.shape}, {key.shape} and '
      f'{value.shape}.'
    )
  if (query.shape[0], *query.shape[2:]) != (key.shape[0], *key.shape[2:]):
    raise ValueError(
      'attention: query, key and value need the same batch, heads and '
      f'head_dim, got {query.shape} and {key.shape}.'
    )
  if not query.dtype == key.dtype == value.dtype or query.dtype not in (
    jnp.bfloat16,
    jnp.float32,
  ):
    raise ValueError(
      'attention takes query, key and value all bfloat16 or all float32, '
      f'got {query.dtype}, {key.dtype} and {value.dtype}.'
    )


# The attention weights (batch, heads, queries, keys) that the forward pass
# keeps for the backward pass when they take at most this many bytes, so
# that it need not compute them again (ViT-B/16 at 224 px, batch 8,
# bfloat16: 7.4 MB a layer, and a backward pass 1.6-1.9 ms faster of some
# 6.5; at 384 px, 64 MB a layer, it recomputes them).
KEPT_WEIGHTS_MAX_BYTES = 16 * 2**20


def keeps_weights(query: jax.Array, key: jax.Array) -> bool:
  """Whether the training forward pass keeps the weights (see above)."""
  batch, queries, heads, _ = query.shape
  size = batch * heads * queries * key.shape[1] * query.dtype.itemsize
  return size <= KEPT_WEIGHTS_MAX_BYTES


@jax.custom_vjp
def attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v in oneDNN, in cache-sized blocks.

  The function of `vit_jax.models.attention.product_attention` (its
  roundings too) on (batch, tokens, heads, head_dim) arrays, bfloat16 or
  float32: `onednn_attention.cc` computes one (image, head) and block of
  queries at a time, so that the logits never leave the cache. Its
  backward pass reads the weights that the forward pass kept where they
  are small (`keeps_weights`) and computes them again otherwise: the same
  gradients to the bit. CPU only.

  Raises:
    Unavailable: where the custom calls cannot be built here.
    ValueError: for arrays of other shapes or dtypes.
  """
  return _forward(query, key, value, keep_weights=False)[0]


def _forward(query, key, value, keep_weights: bool):
  """(out, weights): weights kept, or an empty array in their place."""
  _check_attention(query, key, value)
  batch, queries, heads, _ = query.shape
  # Empty, of the operands' rank (as shard_map types results like them).
  shape = (batch, heads, queries, key.shape[1]) if keep_weights else (0,) * 4
  operands = (query, key, value)
  call = jax.ffi.ffi_call(
    ATTENTION_TARGETS[0],
    tuple(
      custom_calls.result_type(s, query.dtype, operands, 'attention')
      for s in (query.shape, shape)
    ),
  )
  return call(query, key, value, scale=np.float32(query.shape[-1] ** -0.5))


def _attention_fwd(query, key, value):
  out, weights = _forward(
    query, key, value, keep_weights=keeps_weights(query, key)
  )
  return out, (query, key, value, out, weights)


def _attention_bwd(residuals, out_grad):
  query, key, value, out, weights = residuals
  operands = (query, key, value, out)
  call = jax.ffi.ffi_call(
    ATTENTION_TARGETS[1],
    tuple(
      custom_calls.result_type(x.shape, x.dtype, operands, 'attention')
      for x in (query, key, value)
    ),
  )
  return call(
    *operands,
    out_grad.astype(query.dtype),
    weights,
    scale=np.float32(query.shape[-1] ** -0.5),
  )


attention.defvjp(_attention_fwd, _attention_bwd)

"""Matrix products run by oneDNN on CPUs: an optional XLA FFI custom call.

XLA:CPU runs matrix products in YNNPACK, which takes its operands in one
layout: for the products of a training step's backward pass XLA first
copies an operand transposed, and around attention's products it copies
the (batch, tokens, heads, head_dim) arrays into a (batch, heads)-major
layout. oneDNN (the library under torch's CPU matmuls) reads any strided
view in place. `einsum` hands one batched matrix product, written as a
two-operand einsum, to oneDNN through `onednn_matmul.cc`; `matmul` is its
2-D case. With it a ViT-B/16 bfloat16 training step ran about 8% faster
on an AMX-BF16 CPU (the dense layers' backward products), and attention's
six products made a float32 one 15% faster on an AVX-512 CPU without AMX
(docs/performance-cpu.md).

The call is optional: it needs oneDNN from pip (`onednn-cpu-gomp` and
`onednn-devel-cpu-gomp`, in requirements.txt and the `cpu` extra) and a C++
compiler. The source is compiled on first use (about 3 s) into
`$VIT_JAX_KERNEL_CACHE` (default `~/.cache/vit_jax/kernels`), keyed by the
source, jaxlib and oneDNN, and registered with XLA once per process.
`problem()` says why it cannot run here, or None.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

TARGET = 'vit_jax_onednn_matmul'
SOURCE = pathlib.Path(__file__).with_name('onednn_matmul.cc')
INSTALL_HINT = 'pip install onednn-cpu-gomp onednn-devel-cpu-gomp'
_LIBRARY = 'libdnnl.so.3'
_DISTRIBUTIONS = ('onednn-cpu-gomp', 'onednn-devel-cpu-gomp')
# Files of an installation, relative to its prefix.
_HEADER = 'include/oneapi/dnnl/dnnl.hpp'
_MARKERS = (f'lib/{_LIBRARY}', _HEADER)


class Unavailable(RuntimeError):
  """oneDNN's matmul cannot run in this process (the message says why)."""


def _installed_prefixes() -> list[str]:
  """The data roots that pip's oneDNN wheels were installed under."""
  prefixes = []
  for name in _DISTRIBUTIONS:
    try:
      files = importlib.metadata.distribution(name).files or []
    except importlib.metadata.PackageNotFoundError:
      continue
    for file in files:
      for marker in _MARKERS:
        if file.as_posix().endswith(marker):
          path = pathlib.Path(file.locate()).resolve()
          prefixes.append(str(path.parents[marker.count('/')]))
  return prefixes


def _prefixes() -> list[pathlib.Path]:
  """Where to look for oneDNN's lib/ and include/ directories."""
  candidates = [
    os.environ.get('ONEDNN_ROOT'),
    *_installed_prefixes(),
    sysconfig.get_path('data'),
    sys.prefix,
  ]
  return [pathlib.Path(c) for c in dict.fromkeys(candidates) if c]


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


def _cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / '.cache' / 'vit_jax' / 'kernels'
  return pathlib.Path(os.environ.get('VIT_JAX_KERNEL_CACHE', default))


def _compile(include: pathlib.Path, library: pathlib.Path) -> pathlib.Path:
  """The shared object of `SOURCE`, compiled once per source/jaxlib/oneDNN."""
  compiler = os.environ.get('CXX', 'g++')
  if shutil.which(compiler) is None:
    raise Unavailable(
      f'no C++ compiler {compiler!r} to build the oneDNN matmul (install '
      'g++, e.g. `apt-get install g++`, or set $CXX).'
    )
  source = SOURCE.read_bytes()
  key = hashlib.sha256(
    b'\0'.join(
      [
        source,
        jaxlib.__version__.encode(),
        str(library.resolve()).encode(),
        str(library.stat().st_size).encode(),
        compiler.encode(),
      ]
    )
  ).hexdigest()[:16]
  cache = _cache_dir()
  target = cache / f'onednn_matmul-{key}.so'
  if target.is_file():
    return target
  cache.mkdir(parents=True, exist_ok=True)
  # Compiled under a private name, then renamed: concurrent processes
  # (pytest workers) never load a half-written file.
  handle, partial = tempfile.mkstemp(suffix='.so', dir=cache)
  os.close(handle)
  command = [
    compiler,
    '-O2',
    '-std=c++17',
    '-shared',
    '-fPIC',
    '-w',
    str(SOURCE),
    f'-I{jax.ffi.include_dir()}',
    f'-I{include}',
    f'-L{library.parent}',
    f'-l:{_LIBRARY}',
    f'-Wl,-rpath,{library.parent}',
    '-o',
    partial,
  ]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    os.unlink(partial)
    raise Unavailable(
      f'compiling {SOURCE.name} failed ({" ".join(command)}):\n'
      f'{result.stderr[-2000:]}'
    )
  os.replace(partial, target)
  return target


@functools.cache
def _register() -> None:
  """Builds, loads and registers the custom call; raises Unavailable."""
  if sys.platform != 'linux' or platform.machine() not in ('x86_64', 'AMD64'):
    raise Unavailable(
      f'the oneDNN matmul is built for x86-64 Linux, not '
      f'{sys.platform}/{platform.machine()}.'
    )
  include, library = _find_onednn()
  shared_object = ctypes.cdll.LoadLibrary(str(_compile(include, library)))
  jax.ffi.register_ffi_target(
    TARGET,
    jax.ffi.pycapsule(shared_object.VitJaxOnednnMatmul),
    platform='cpu',
  )


@functools.cache
def problem() -> str | None:
  """Why the oneDNN matmul cannot run in this process, or None if it can."""
  try:
    _register()
  except Unavailable as error:
    return str(error)
  return None


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
  why = problem()
  if why is not None:
    raise Unavailable(why)
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
  manual_axes = jax.typeof(a).mat
  if manual_axes != jax.typeof(b).mat:
    raise ValueError(
      'einsum: inside shard_map both operands must vary over the same mesh '
      f'axes, not {jax.typeof(a)} and {jax.typeof(b)} (jax.lax.pcast one).'
    )
  result = jax.ShapeDtypeStruct(out_shape, jnp.float32)
  if not manual_axes.empty:  # Inside shard_map: varies as the operands do.
    result = jax.ShapeDtypeStruct(
      result.shape,
      result.dtype,
      sharding=jax.typeof(a).sharding,
      manual_axis_type=manual_axes,
    )
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
  """
  if a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype:
    raise ValueError(
      f'matmul takes two 2-D arrays of one dtype, got {a.dtype}{a.shape} '
      f'and {b.dtype}{b.shape}.'
    )
  inner = a.shape[0] if transpose_a else a.shape[1]
  inner_b = b.shape[1] if transpose_b else b.shape[0]
  if inner != inner_b:
    raise ValueError(
      f'matmul: contracted sizes differ ({inner} and {inner_b}) for '
      f'{a.shape}, {b.shape}, transpose_a={transpose_a}, '
      f'transpose_b={transpose_b}.'
    )
  a_letters = 'km' if transpose_a else 'mk'
  b_letters = 'nk' if transpose_b else 'kn'
  return einsum(f'{a_letters},{b_letters}->mn', a, b)

"""Dense products run by oneDNN on CPUs: an optional XLA FFI custom call.

XLA:CPU runs bfloat16 matrix products in YNNPACK, which takes its operands
in one layout: for the products of a training step's backward pass XLA
first copies an operand transposed. oneDNN (the library under torch's CPU
matmuls) reads a transposed operand in place, and with it a ViT-B/16
bfloat16 training step ran about 8% faster on an AMX-BF16 CPU
(docs/performance-cpu.md). `matmul` hands one 2-D product to oneDNN
through `onednn_matmul.cc`.

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
  why = problem()
  if why is not None:
    raise Unavailable(why)
  if a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype:
    raise ValueError(
      f'matmul takes two 2-D arrays of one dtype, got {a.dtype}{a.shape} '
      f'and {b.dtype}{b.shape}.'
    )
  rows = a.shape[1] if transpose_a else a.shape[0]
  inner = a.shape[0] if transpose_a else a.shape[1]
  inner_b = b.shape[1] if transpose_b else b.shape[0]
  columns = b.shape[0] if transpose_b else b.shape[1]
  if inner != inner_b:
    raise ValueError(
      f'matmul: contracted sizes differ ({inner} and {inner_b}) for '
      f'{a.shape}, {b.shape}, transpose_a={transpose_a}, '
      f'transpose_b={transpose_b}.'
    )
  manual_axes = jax.typeof(a).mat
  if manual_axes != jax.typeof(b).mat:
    raise ValueError(
      'matmul: inside shard_map both operands must vary over the same mesh '
      f'axes, not {jax.typeof(a)} and {jax.typeof(b)} (jax.lax.pcast one).'
    )
  result = jax.ShapeDtypeStruct((rows, columns), jnp.float32)
  if not manual_axes.empty:  # Inside shard_map: varies as the operands do.
    result = jax.ShapeDtypeStruct(
      result.shape,
      result.dtype,
      sharding=jax.typeof(a).sharding,
      manual_axis_type=manual_axes,
    )
  call = jax.ffi.ffi_call(TARGET, result)
  return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)

"""What the CPU custom calls of vit_jax/kernels share: finding, building, typing.

Each library's module (`onednn`, `mkl`) names its sources, the files it
needs from its pip wheels and how to link them; this module finds those
files, compiles the sources once into a shared object kept in
`$VIT_JAX_KERNEL_CACHE` (default `~/.cache/vit_jax/kernels`, keyed by the
sources, jaxlib and the libraries linked) and types the calls' results
inside and outside shard_map.
"""

import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import jaxlib


class Unavailable(RuntimeError):
  """A custom call cannot run here (the message says why)."""


def problem_of(register: Callable[[], None]) -> str | None:
  """Why `register` (a library's build-and-register step) fails, or None."""
  try:
    register()
  except Unavailable as error:
    return str(error)
  return None


def require(problem: str | None) -> None:
  """Raises Unavailable with `problem` (a library's `problem()`), if any."""
  if problem is not None:
    raise Unavailable(problem)


def require_x86_64_linux(what: str) -> None:
  """Raises Unavailable off x86-64 Linux, where the wheels do not exist."""
  if sys.platform != 'linux' or platform.machine() not in ('x86_64', 'AMD64'):
    raise Unavailable(
      f'the {what} custom calls are built for x86-64 Linux, not '
      f'{sys.platform}/{platform.machine()}.'
    )


@functools.cache
def cpu_vendor(cpuinfo: pathlib.Path = pathlib.Path('/proc/cpuinfo')) -> str:
  """The CPU's vendor id ('GenuineIntel', 'AuthenticAMD', ...), '' if unknown.

  Read from Linux's /proc/cpuinfo, where the custom calls run; '' elsewhere.
  """
  try:
    text = cpuinfo.read_text()
  except OSError:
    return ''
  match = re.search(r'^vendor_id\s*:\s*(\S+)', text, flags=re.MULTILINE)
  return match.group(1) if match else ''


def installed_prefixes(
  distributions: Sequence[str], markers: Sequence[str]
) -> list[str]:
  """The data roots that pip installed `distributions`' `markers` under.

  A marker is a file path relative to its prefix (e.g. 'lib/libdnnl.so.3').
  """
  prefixes = []
  for name in distributions:
    try:
      files = importlib.metadata.distribution(name).files or []
    except importlib.metadata.PackageNotFoundError:
      continue
    for file in files:
      for marker in markers:
        if file.as_posix().endswith(marker):
          path = pathlib.Path(file.locate()).resolve()
          prefixes.append(str(path.parents[marker.count('/')]))
  return prefixes


def search_prefixes(
  root_variable: str, distributions: Sequence[str], markers: Sequence[str]
) -> list[pathlib.Path]:
  """Where to look for a library: $`root_variable`, its wheels, this env."""
  candidates = [
    os.environ.get(root_variable),
    *installed_prefixes(distributions, markers),
    sysconfig.get_path('data'),
    sys.prefix,
  ]
  return [pathlib.Path(c) for c in dict.fromkeys(candidates) if c]


def cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / '.cache' / 'vit_jax' / 'kernels'
  return pathlib.Path(os.environ.get('VIT_JAX_KERNEL_CACHE', default))


def compile_sources(
  name: str,
  sources: Sequence[pathlib.Path],
  include_dirs: Sequence[pathlib.Path],
  libraries: Sequence[pathlib.Path],
  flags: Sequence[str] = (),
) -> pathlib.Path:
  """The shared object of `sources`, compiled once per source/jaxlib/library.

  Args:
    name: the stem of the shared object's file name.
    sources: C++ files, compiled together.
    include_dirs: header directories, beside jax's FFI headers.
    libraries: shared libraries linked by file name (with an rpath to their
      directories).
    flags: further compiler flags (e.g. '-fopenmp').

  Raises:
    Unavailable: without a C++ compiler, or where compiling fails (with the
      compiler's messages).
  """
  compiler = os.environ.get('CXX', 'g++')
  if shutil.which(compiler) is None:
    raise Unavailable(
      f'no C++ compiler {compiler!r} to build the {name} custom calls '
      '(install g++, e.g. `apt-get install g++`, or set $CXX).'
    )
  key = hashlib.sha256(
    b'\0'.join(
      [
        *(source.read_bytes() for source in sources),
        jaxlib.__version__.encode(),
        *(str(library.resolve()).encode() for library in libraries),
        *(str(library.stat().st_size).encode() for library in libraries),
        compiler.encode(),
        ' '.join(flags).encode(),
      ]
    )
  ).hexdigest()[:16]
  cache = cache_dir()
  target = cache / f'{name}-{key}.so'
  if target.is_file():
    return target
  cache.mkdir(parents=True, exist_ok=True)
  # Compiled under a private name, then renamed: concurrent processes
  # (pytest workers) never load a half-written file.
  handle, partial = tempfile.mkstemp(suffix='.so', dir=cache)
  os.close(handle)
  link = []
  for directory in dict.fromkeys(library.parent for library in libraries):
    link += [f'-L{directory}', f'-Wl,-rpath,{directory}']
  command = [
    compiler,
    '-O3',
    '-std=c++17',
    *flags,
    '-shared',
    '-fPIC',
    '-w',
    *map(str, sources),
    f'-I{jax.ffi.include_dir()}',
    *(f'-I{directory}' for directory in include_dirs),
    *link,
    *(f'-l:{library.name}' for library in libraries),
    '-o',
    partial,
  ]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    os.unlink(partial)
    raise Unavailable(
      f'compiling {", ".join(source.name for source in sources)} failed ({" ".join(command)}):\n'
      f'{result.stderr[-2000:]}'
    )
  os.replace(partial, target)
  return target


def matrix_product_shape(
  name: str,
  a: jax.Array,
  b: jax.Array,
  transpose_a: bool,
  transpose_b: bool,
  dtypes: Sequence[jnp.dtype] = (jnp.float32, jnp.bfloat16),
) -> tuple[int, int]:
  """The (rows, columns) of op(a) @ op(b), checking the operands.

  Raises:
    ValueError: unless `a` and `b` are matrices of one of `dtypes` whose
      contracted sizes agree.
  """
  if (
    a.ndim != 2
    or b.ndim != 2
    or a.dtype != b.dtype
    or jnp.dtype(a.dtype) not in map(jnp.dtype, dtypes)
  ):
    names = ' or '.join(jnp.dtype(d).name for d in dtypes)
    raise ValueError(
      f'{name} takes two 2-D arrays of one dtype ({names}), got '
      f'{a.dtype}{a.shape} and {b.dtype}{b.shape}.'
    )
  rows, inner = a.shape[::-1] if transpose_a else a.shape
  inner_b, columns = b.shape[::-1] if transpose_b else b.shape
  if inner != inner_b:
    raise ValueError(
      f'{name}: contracted sizes differ ({inner} and {inner_b}) for '
      f'{a.shape}, {b.shape}, transpose_a={transpose_a}, '
      f'transpose_b={transpose_b}.'
    )
  return rows, columns


def result_type(shape, dtype, operands, name: str) -> jax.ShapeDtypeStruct:
  """A custom call's result, varying inside shard_map as its operands do."""
  manual_axes = jax.typeof(operands[0]).mat
  if any(jax.typeof(x).mat != manual_axes for x in operands):
    kinds = ', '.join(str(jax.typeof(x)) for x in operands)
    raise ValueError(
      f'{name}: inside shard_map all operands must vary over the same mesh '
      f'axes, not {kinds} (jax.lax.pcast one).'
    )
  if manual_axes.empty:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(
    shape,
    dtype,
    sharding=jax.typeof(operands[0]).sharding,
    manual_axis_type=manual_axes,
  )

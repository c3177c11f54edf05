"""Matrix products run by Intel MKL's GEMM on CPUs: an optional custom call.

torch's CPU float32 matmuls are MKL's `sgemm`; XLA:CPU's are YNNPACK's,
which ran ViT-B/16's float32 products at about 250-290 GFLOP/s on this
project's 2-core AVX-512 machine where MKL ran 335-355 (near the cores'
peak), and which copies an operand it reads transposed (every backward
product of a dense layer) first. `matmul` hands one 2-D product to MKL
(`cblas_sgemm` in float32, `cblas_gemm_bf16bf16f32` in bfloat16, AMX where
the CPU has it), transposed operands read in place: a ViT-B/16 float32
training step ran 1.20-1.25x faster with every dense product in MKL
(`matmul='auto'` picks it for float32 on one CPU device; in bfloat16
oneDNN's products with XLA's small forward ones were as fast or faster,
docs/performance-cpu.md).

Optional: it needs MKL from pip (`mkl` and `mkl-include`, in
requirements.txt and the `cpu` extra) and a C++ compiler. MKL runs on GNU
OpenMP (`libmkl_gnu_thread`), the threads of the oneDNN calls too. The
source is compiled on first use (about 2 s) into `$VIT_JAX_KERNEL_CACHE`,
like the oneDNN calls' (`custom_calls.compile_sources`). `problem()` says
why it cannot run here, or None.
"""

import ctypes
import functools
import pathlib

import jax
import jax.numpy as jnp

from vit_jax.kernels import custom_calls

TARGET = 'vit_jax_mkl_gemm'
SOURCES = (pathlib.Path(__file__).with_name('mkl_gemm.cc'),)
INSTALL_HINT = 'pip install mkl mkl-include'
_DISTRIBUTIONS = ('mkl', 'mkl-include')
_HEADER = 'include/mkl_cblas.h'
# MKL's LP64 interface, GNU OpenMP threading layer and core, in link order.
_LIBRARIES = (
  'libmkl_intel_lp64.so.3',
  'libmkl_gnu_thread.so.3',
  'libmkl_core.so.3',
)
_MARKERS = (_HEADER, *(f'lib/{name}' for name in _LIBRARIES))

Unavailable = custom_calls.Unavailable


def _prefixes() -> list[pathlib.Path]:
  """Where to look for MKL's lib/ and include/ directories."""
  return custom_calls.search_prefixes('MKLROOT', _DISTRIBUTIONS, _MARKERS)


def _find_mkl() -> tuple[pathlib.Path, list[pathlib.Path]]:
  """(include directory, library files) of an installed MKL.

  The headers (`mkl-include`) and the libraries (`mkl`) are separate wheels,
  so each is looked for under every prefix.
  """
  prefixes = _prefixes()
  include = next(
    (p / 'include' for p in prefixes if (p / _HEADER).is_file()), None
  )
  lib = next(
    (
      p / 'lib'
      for p in prefixes
      if all((p / 'lib' / name).is_file() for name in _LIBRARIES)
    ),
    None,
  )
  if include is None or lib is None:
    raise Unavailable(
      f'MKL was not found (looked for {_HEADER} and lib/{", lib/".join(_LIBRARIES)} under '
      f'{", ".join(map(str, prefixes))}); `{INSTALL_HINT}` installs it, or set $MKLROOT.'
    )
  return include, [lib / name for name in _LIBRARIES]


@functools.cache
def _register() -> None:
  """Builds, loads and registers the custom call; raises Unavailable."""
  custom_calls.require_x86_64_linux('MKL')
  include, libraries = _find_mkl()
  # -fopenmp links GNU OpenMP, which MKL's threading layer runs on.
  shared_object = ctypes.cdll.LoadLibrary(
    str(
      custom_calls.compile_sources(
        'mkl', SOURCES, [include], libraries, flags=['-fopenmp']
      )
    )
  )
  jax.ffi.register_ffi_target(
    TARGET, jax.ffi.pycapsule(shared_object.VitJaxMklGemm), platform='cpu'
  )


@functools.cache
def problem() -> str | None:
  """Why the MKL custom call cannot run here, or None if it can."""
  return custom_calls.problem_of(_register)


def unsuited() -> str | None:
  """Why `matmul='auto'` should not pick MKL on this CPU, or None.

  MKL's fast GEMM kernels are Intel's. On a 2-core AMD EPYC with AVX-512
  and AVX512-BF16 (2026-12-03) its products ran ViT-B/16's shapes at
  160-185 GFLOP/s in both dtypes, where XLA's float32 ones ran at 290-410
  and oneDNN's bfloat16 ones at 670-800, and a float32 training step took
  1.7x as long as with XLA's products. So `auto` takes it on Intel CPUs
  only; `matmul='mkl'` still runs it anywhere.
  """
  vendor = custom_calls.cpu_vendor()
  if vendor == 'GenuineIntel':
    return None
  return (
    "its fast kernels are Intel's, and this CPU is "
    f'{vendor or "of an unknown vendor"}.'
  )


def matmul(
  a: jax.Array,
  b: jax.Array,
  *,
  transpose_a: bool = False,
  transpose_b: bool = False,
) -> jax.Array:
  """op(a) @ op(b) in MKL, for 2-D `a` and `b` of one dtype.

  op(x) is x, or x.T where `transpose_*` is set (read in place, not
  copied). Operands are both float32 or both bfloat16; the product is
  accumulated and returned in float32. CPU only.

  Raises:
    Unavailable: where the custom call cannot be built here.
    ValueError: for operands that are not two matrices of one such dtype
      whose contracted sizes agree.
  """
  rows, columns = custom_calls.matrix_product_shape(
    'mkl.matmul', a, b, transpose_a, transpose_b
  )
  custom_calls.require(problem())
  call = jax.ffi.ffi_call(
    TARGET,
    custom_calls.result_type((rows, columns), jnp.float32, (a, b), 'matmul'),
  )
  return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)

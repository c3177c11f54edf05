"""The MKL GEMM custom call: its own checks and how it is built.

Its products are tested with oneDNN's in test_matrix_products.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import needs_custom_calls, random_operands
from vit_jax.kernels import custom_calls, mkl

pytestmark = needs_custom_calls('mkl')


def test_the_call_checks_shapes_and_dtypes_itself():
  # Called directly (not through mkl.matmul): the C++ side refuses what it
  # cannot compute rather than reading outside a buffer.
  a, b = random_operands((4, 5), (5, 3), 'float32')

  def call(result, a, b):
    return jax.block_until_ready(
      jax.ffi.ffi_call(mkl.TARGET, result)(
        a, b, transpose_a=False, transpose_b=False
      )
    )

  good = call(jax.ShapeDtypeStruct((4, 3), jnp.float32), a, b)
  np.testing.assert_allclose(good, np.asarray(a) @ np.asarray(b), rtol=1e-5)
  with pytest.raises(Exception, match='shapes do not match'):
    call(jax.ShapeDtypeStruct((4, 4), jnp.float32), a, b)
  with pytest.raises(Exception, match='both bfloat16 or both float32'):
    call(jax.ShapeDtypeStruct((4, 3), jnp.bfloat16), a, b)
  half = a.astype(jnp.float16), b.astype(jnp.float16)
  with pytest.raises(Exception, match='bfloat16 or float32'):
    call(jax.ShapeDtypeStruct((4, 3), jnp.float32), *half)


def test_compiled_once_and_kept(tmp_path, monkeypatch):
  monkeypatch.setenv('VIT_JAX_KERNEL_CACHE', str(tmp_path))
  include, libraries = mkl._find_mkl()
  compile_ = custom_calls.compile_sources
  first = compile_('mkl', mkl.SOURCES, [include], libraries)
  assert first.parent == tmp_path and first.name.startswith('mkl-')
  modified = first.stat().st_mtime_ns
  assert compile_('mkl', mkl.SOURCES, [include], libraries) == first
  assert first.stat().st_mtime_ns == modified
  assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_missing_mkl_names_the_install_command(tmp_path, monkeypatch):
  # The headers without the libraries (mkl-include installed alone).
  (tmp_path / 'include').mkdir()
  (tmp_path / 'include' / 'mkl_cblas.h').write_text('')
  monkeypatch.setattr(mkl, '_prefixes', lambda: [tmp_path])
  with pytest.raises(mkl.Unavailable) as e:
    mkl._find_mkl()
  assert mkl.INSTALL_HINT in str(e.value) and str(tmp_path) in str(e.value)
  assert 'libmkl_core' in str(e.value)


def test_source_ships_beside_the_module():
  for source in mkl.SOURCES:
    assert source.is_file() and source.parent.name == 'kernels'

"""`pip install .` and `pip install -e .` work from a clean checkout, offline.

The package is built from a copy of the repository's files (what git tracks
or would track: no build outputs, no virtual environments) with the
setuptools of this environment, and installed into a fresh virtual
environment that sees this one's packages but not the repository.
"""

import email
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from vit_jax.kernels import mkl as kernels_mkl
from vit_jax.kernels import onednn as kernels_onednn

ROOT = Path(__file__).resolve().parents[1]

# What the installed package must import (vit_jax/__init__.py and the model
# zoo); prints where it came from and whether configs/ leaked in.
IMPORT_CHECK = """
import importlib.util
import vit_jax, vit_jax.models
print(vit_jax.__file__)
print(len(vit_jax.models.list_models()))
print(importlib.util.find_spec('configs'))
import vit_jax.kernels.mkl, vit_jax.kernels.onednn
print(vit_jax.kernels.onednn.problem())
print(vit_jax.kernels.mkl.problem())
"""


def run(command, **kwargs):
  result = subprocess.run(
    command, capture_output=True, text=True, timeout=120, **kwargs
  )
  assert result.returncode == 0, (
    f'{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
  )
  return result.stdout


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """The repository's files as a fresh clone of them would hold them."""
  setuptools = importlib.metadata.version('setuptools')
  assert int(setuptools.split('.')[0]) >= 77, (
    f'setuptools {setuptools} cannot build pyproject.toml (PEP 639 license '
    'fields); run `pip install -r requirements.txt`.'
  )
  files = run(
    ['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'],
    cwd=ROOT,
  ).split('\0')
  copy = tmp_path_factory.mktemp('checkout')
  for name in filter(None, files):
    if (ROOT / name).is_file():  # not deleted since the last commit
      (copy / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, copy / name)
  return copy


def install(wheel, tmp_path):
  """A fresh venv that sees this environment's packages, with `wheel`."""
  environment = tmp_path / 'venv'
  venv.create(environment, with_pip=False)
  python = environment / 'bin' / 'python'
  site_packages = Path(
    run(
      [python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))']
    ).strip()
  )
  # This environment's packages (jax, flax, ...) after the venv's own; its
  # .pth files are processed too.
  parents = {sysconfig.get_path('purelib'), sysconfig.get_path('platlib')}
  (site_packages / 'parent_environment.pth').write_text(
    ''.join(f'import site; site.addsitedir({p!r})\n' for p in parents)
  )
  # This environment's pip installs into the venv's site-packages only: no
  # index, no dependencies (they are this environment's).
  run(
    [
      sys.executable,
      '-m',
      'pip',
      'install',
      '--quiet',
      '--no-deps',
      '--no-index',
      '--target',
      site_packages,
      wheel,
    ]
  )
  return python, site_packages


def import_elsewhere(python, tmp_path):
  """Imports vit_jax from a directory that has no vit_jax/ nor configs/."""
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = {  # no PYTHONPATH
    'PATH': '/usr/bin:/bin',
    'JAX_PLATFORMS': 'cpu',
    'VIT_JAX_KERNEL_CACHE': os.environ['VIT_JAX_KERNEL_CACHE'],
  }
  lines = run([python, '-c', IMPORT_CHECK], cwd=elsewhere, env=env)
  *found, onednn, mkl = lines.strip().splitlines()[-5:]
  module_file, model_count, configs = found
  return Path(module_file), int(model_count), configs, onednn, mkl


def test_wheel_installs_the_package_and_nothing_else(source, tmp_path):
  run(
    [
      sys.executable,
      '-m',
      'pip',
      'wheel',
      '--quiet',
      '--no-deps',
      '--no-build-isolation',
      '--no-index',
      '--wheel-dir',
      tmp_path / 'dist',
      source,
    ],
    cwd=tmp_path,
  )
  (wheel,) = (tmp_path / 'dist').glob('vit_jax-*.whl')
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    (metadata_name,) = [n for n in names if n.endswith('.dist-info/METADATA')]
    metadata = email.message_from_bytes(archive.read(metadata_name))

  # Every module of vit_jax and its subpackages (and the custom calls' C++
  # sources, compiled where they run), and only those.
  sources = {
    p.relative_to(source).as_posix()
    for pattern in ('vit_jax/**/*.py', 'vit_jax/kernels/*.cc')
    for p in source.glob(pattern)
  }
  assert {
    'vit_jax/kernels/onednn_matmul.cc',
    'vit_jax/kernels/onednn_attention.cc',
    'vit_jax/kernels/mkl_gemm.cc',
  } <= sources
  packaged = {n for n in names if not n.split('/')[0].endswith('.dist-info')}
  assert packaged == sources
  assert any(n.endswith('.dist-info/licenses/LICENSE') for n in names)

  assert metadata['Name'] == 'vit_jax'
  assert metadata['License-Expression'] == 'Apache-2.0'
  assert {'cuda', 'cpu', 'tpu', 'test'} <= set(
    metadata.get_all('Provides-Extra')
  )
  requires = metadata.get_all('Requires-Dist')
  assert any(
    r.startswith('jax[cuda13]') and 'extra == "cuda"' in r for r in requires
  )
  assert any(
    r.startswith('jax[tpu]') and 'extra == "tpu"' in r for r in requires
  )
  assert any(
    r.startswith('pytest') and 'extra == "test"' in r for r in requires
  )
  for name in ('onednn-cpu-gomp', 'mkl', 'mkl-include'):
    assert any(
      re.match(rf'{name}[<>=]', r) and 'extra == "cpu"' in r for r in requires
    ), name

  python, site_packages = install(wheel, tmp_path)
  module_file, model_count, configs, onednn, mkl = import_elsewhere(
    python, tmp_path
  )
  assert module_file == site_packages / 'vit_jax' / '__init__.py'
  assert model_count > 20  # ViT, hybrids, BiT and ViTc rows
  assert configs == 'None'  # configs/ stays in the repository
  # The installed custom calls' sources compile against the oneDNN and MKL
  # wheels of the environment, wherever they are.
  assert onednn == str(kernels_onednn.problem())
  assert mkl == str(kernels_mkl.problem())


def test_editable_install_imports_from_the_checkout(source, tmp_path):
  # What `pip install -e .` does: setuptools' PEP 660 editable wheel.
  run(
    [
      sys.executable,
      '-c',
      'import sys; from setuptools import build_meta; '
      'print(build_meta.build_editable(sys.argv[1]))',
      tmp_path / 'dist',
    ],
    cwd=source,
  )
  (wheel,) = (tmp_path / 'dist').glob('vit_jax-*.whl')
  python, _ = install(wheel, tmp_path)
  module_file, model_count, configs, _, _ = import_elsewhere(python, tmp_path)
  assert module_file == source / 'vit_jax' / '__init__.py'
  assert model_count > 20
  assert configs == 'None'

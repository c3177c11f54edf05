"""The fine-tuning notebook runs top to bottom; its install cell, on Colab only."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nbclient
import nbformat
import pytest

from vit_jax.data.write_digits_folder import CLASS_NAMES

NOTEBOOK = Path(__file__).resolve().parents[1] / 'notebooks' / 'finetune.ipynb'


def test_finetune_notebook_runs(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # Shorter runs and a fresh workdir; everything else as a user runs it.
  for cell in notebook.cells:
    if 'PRETRAIN_STEPS =' in cell.source:
      cell.source = re.sub(
        r'PRETRAIN_STEPS = \d+', 'PRETRAIN_STEPS = 100', cell.source
      )
      cell.source = re.sub(
        r'FINETUNE_STEPS = \d+', 'FINETUNE_STEPS = 40', cell.source
      )
      cell.source = re.sub(
        r"WORKDIR = '.*'", f"WORKDIR = '{tmp_path}'", cell.source
      )
      break
  else:
    raise AssertionError('The notebook has no parameters cell.')
  client = nbclient.NotebookClient(
    notebook,
    timeout=600,
    kernel_name='python3',
    resources={'metadata': {'path': str(NOTEBOOK.parent)}},
  )
  client.execute()  # Raises CellExecutionError on any failing cell.
  outputs = [o for cell in notebook.cells for o in cell.get('outputs', [])]
  text = ''.join(o.get('text', '') for o in outputs)
  accuracy = float(re.search(r'test accuracy ([\d.]+)', text).group(1))
  assert accuracy > 0.3  # 10 classes: chance is 0.1
  assert any('image/png' in o.get('data', {}) for o in outputs)
  assert (tmp_path / 'finetune' / 'model.npz').exists()
  # Your own images: the digits folder, its held-out split recorded, and the
  # class names (the folder names) in the predictions.
  own = float(re.search(r'own images: test accuracy ([\d.]+)', text).group(1))
  assert own > 0.3
  splits = json.loads((tmp_path / 'own_images' / 'splits.json').read_text())
  assert splits['splits']['test']
  predictions = json.loads(
    (tmp_path / 'own_images_predict' / 'predictions.json').read_text()
  )
  names = {
    entry['class']
    for prediction in predictions['predictions']
    for entry in prediction['top_k']
  }
  assert names and names <= set(CLASS_NAMES)


# The first code cell installs the project, only on Colab.
COLAB_CHECK = "if 'google.colab' in sys.modules:"


def install_cell():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  code = [cell.source for cell in notebook.cells if cell.cell_type == 'code']
  assert COLAB_CHECK in code[0], 'The install cell must run first.'
  return code[0]


class Machine:
  """Stands in for subprocess.run: records commands, answers nvidia-smi."""

  def __init__(self, driver=None):
    self.driver = driver
    self.commands = []

  def run(self, command, **kwargs):
    self.commands.append(command)
    stdout = ''
    if command[0] == 'nvidia-smi':
      stdout = f'{self.driver}\n'
    elif command[:2] == ['git', 'clone']:
      clone = Path(command[-1]) / 'vit_jax'
      clone.mkdir(parents=True)
      (clone / '__init__.py').touch()
    return subprocess.CompletedProcess(command, 0, stdout=stdout)


def fake_checkout(path):
  (path / 'vit_jax').mkdir(parents=True)
  (path / 'vit_jax' / '__init__.py').touch()
  return path


def test_install_cell_does_nothing_outside_colab(monkeypatch, tmp_path):
  monkeypatch.delitem(sys.modules, 'google.colab', raising=False)
  monkeypatch.chdir(fake_checkout(tmp_path))

  def must_not_run(*args, **kwargs):
    raise AssertionError(f'ran {args} outside Colab')

  monkeypatch.setattr(subprocess, 'run', must_not_run)
  monkeypatch.setattr(os, 'chdir', must_not_run)
  exec(install_cell(), {})


def simulate_colab(monkeypatch, gpu_driver=None, tpu=False):
  monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('colab'))
  machine = Machine(gpu_driver)
  monkeypatch.setattr(subprocess, 'run', machine.run)
  monkeypatch.setattr(
    shutil, 'which', lambda name: f'/usr/bin/{name}' if gpu_driver else None
  )
  monkeypatch.setattr(
    glob, 'glob', lambda pattern: ['/dev/accel0'] if tpu else []
  )
  return machine


@pytest.mark.parametrize(
  'gpu_driver, tpu, extra',
  [
    ('580.82.07', False, '[cuda]'),
    ('550.54.15', False, '[cuda12]'),
    (None, True, '[tpu]'),
    (None, False, ''),
  ],
)
def test_install_cell_on_colab_picks_the_extra(
  monkeypatch, tmp_path, gpu_driver, tpu, extra
):
  machine = simulate_colab(monkeypatch, gpu_driver, tpu)
  checkout = fake_checkout(tmp_path / 'upload')
  monkeypatch.chdir(checkout)
  exec(install_cell(), {})
  pip = [
    sys.executable,
    '-m',
    'pip',
    'install',
    '--quiet',
    f'{checkout}{extra}',
  ]
  assert machine.commands[-1] == pip
  assert os.getcwd() == str(checkout)


def test_install_cell_on_colab_clones_the_repository(monkeypatch, tmp_path):
  machine = simulate_colab(monkeypatch)
  monkeypatch.chdir(tmp_path)
  source = install_cell()
  with pytest.raises(RuntimeError, match='set REPOSITORY'):
    exec(source, {})  # no copy here and no URL to clone

  clone = tmp_path / 'content' / 'vit_jax'
  url = 'https://example.org/vit_jax.git'
  source = source.replace("REPOSITORY = ''", f'REPOSITORY = {url!r}')
  source = source.replace(
    "CHECKOUT = '/content/vit_jax'", f'CHECKOUT = {str(clone)!r}'
  )
  exec(source, {})
  assert machine.commands == [
    ['git', 'clone', '--depth=1', url, str(clone)],
    [sys.executable, '-m', 'pip', 'install', '--quiet', str(clone)],
  ]
  assert os.getcwd() == str(clone)

"""The fine-tuning notebook runs top to bottom (on the bundled digits)."""

import re
from pathlib import Path

import nbclient
import nbformat

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

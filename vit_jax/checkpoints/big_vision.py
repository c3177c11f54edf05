"""big_vision's ViT .npz layout.

big_vision (google-research/big_vision, `models/vit.py`) names the ViT's
parameters as this project does except that:
- the learned position embedding is `pos_embedding` at the top level, with
  no row for the class token (`pool_type='tok'` adds the class token after
  the embedding): a zero row for it is the same function;
- blocks are numbered per module type (LayerNorm_1,
  MultiHeadDotProductAttention_0, MlpBlock_0), and scanned models stack
  them under `Transformer/encoderblock/` with a leading depth axis;
- the parameters sit under `params/` (or `params/img/` for SigLIP's image
  tower) of a train-state file whose other entries are skipped;
- bfloat16 arrays are stored as raw 2-byte void, re-viewed here.
Pooling and position embedding come from the keys: `MAPHead_0` is 'map',
`cls` is 'token', neither 'gap' (big_vision's `pool_type='0'`, token 0
without a class parameter, cannot be told from 'gap' and is not
supported); no `pos_embedding` is the fixed 'sincos2d'.
"""

import re
import zipfile
import zlib

import ml_dtypes
import numpy as np
from etils import epath

from vit_jax.checkpoints import infer, layout, npz

NAME = 'big_vision'
_PREFIXES = ('params/img/', 'params/', 'opt/target/', '')
_PER_TYPE = re.compile(r'Transformer/encoderblock(_\d+)?/MlpBlock_0/')


def _prefix(keys) -> str | None:
  return next((p for p in _PREFIXES if p + 'embedding/kernel' in keys), None)


def matches(path: epath.Path) -> bool:
  if not (path.is_file() and path.suffix == '.npz'):
    return False
  try:
    with path.open('rb') as f, np.load(f, allow_pickle=False) as data:
      keys = set(data.files)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error):
    return False  # The npz layout reports an unreadable file.
  prefix = _prefix(keys)
  if prefix is None or prefix + 'Transformer/posembed_input' in {
    k.rsplit('/', 1)[0] for k in keys
  }:
    return False
  return prefix + 'pos_embedding' in keys or any(
    _PER_TYPE.match(k[len(prefix) :]) for k in keys if k.startswith(prefix)
  )


def _as_float32(value: np.ndarray) -> np.ndarray:
  # numpy has no bfloat16: big_vision's files store it as 2-byte void.
  if value.dtype.kind == 'V' and value.dtype.itemsize == 2:
    value = value.view(ml_dtypes.bfloat16)
  return np.asarray(value, np.float32)


def read(path: epath.Path, options: layout.ReadOptions):
  """(variables, description) of a big_vision ViT file."""
  layout.single_weights(path, options)
  flat = npz.read_flat(path)
  prefix = _prefix(flat)
  flat = {
    k[len(prefix) :]: _as_float32(v)
    for k, v in flat.items()
    if k.startswith(prefix)
  }
  posemb = flat.pop('pos_embedding', None)
  if posemb is not None:
    if 'cls' in flat:
      posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    flat['Transformer/posembed_input/pos_embedding'] = posemb
  params = npz.from_published(flat)
  name, image_size = infer.name_from_file(path)
  description = infer.describe(
    params,
    model_name=options.model_name or name,
    source=path,
    image_size=image_size,
  )
  return {'params': params}, description


LAYOUT = layout.Layout(
  name=NAME,
  expects="a big_vision ViT .npz (top-level 'pos_embedding' or per-type "
  "numbered blocks 'Transformer/encoderblock_{i}/MlpBlock_0', optionally "
  "under 'params/' or 'params/img/')",
  matches=matches,
  read=read,
)

"""Published weights by name: `augreg:<file>`, `imagenet21k:<model>`, ...

`--config.init=augreg:B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0`
is `gs://vit_models/augreg/<name>.npz`; `imagenet21k:ViT-B_16` and
`imagenet21k+imagenet2012:ViT-B_16` are the original release's files. A
name is fetched once (through `etils.epath`, so `gs://` works wherever the
Google Cloud Storage client does) into a local cache: `weights_cache`, else
$VIT_JAX_WEIGHTS, else ~/.cache/vit_jax/weights, as
`<cache>/<collection>/<name>.npz`. A file already there is used without
any network access; so offline, put the file there.
"""

import concurrent.futures
import os
import re

from etils import epath

from vit_jax.models import registry

BUCKET = 'gs://vit_models'
ENV = 'VIT_JAX_WEIGHTS'
DEFAULT_CACHE = '~/.cache/vit_jax/weights'
# Seconds to wait for the bucket to answer before calling it unreachable.
PROBE_TIMEOUT = 10.0

# The original release (the paper's models), by collection. Files are named
# after the model, fine-tuned ones at 384 px unless suffixed '-224'.
ORIGINAL = {
  'imagenet21k': (
    'ViT-B_16',
    'ViT-B_32',
    'ViT-L_16',
    'ViT-L_32',
    'ViT-H_14',
    'R50+ViT-B_16',
  ),
  'imagenet21k+imagenet2012': (
    'ViT-B_16',
    'ViT-B_16-224',
    'ViT-B_32',
    'ViT-L_16',
    'ViT-L_16-224',
    'ViT-L_32',
    'R50+ViT-B_16',
  ),
}
# The AugReg release's recommended ImageNet-21k pre-trainings (its README);
# any file of gs://vit_models/augreg/index.csv resolves the same way, e.g.
# with a fine-tuning suffix '--imagenet2012-steps_20k-lr_0.01-res_384'.
AUGREG_RECOMMENDED = (
  'Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0',
  'S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0',
  'S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0',
  'B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0',
  'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0',
  'B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0',
  'L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0',
  'R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0',
  'R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0',
  'R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1',
)
COLLECTIONS = ('augreg', *ORIGINAL)
_SCHEME = re.compile(r'^([a-z0-9+]+):(?!//)(.+)$')


class WeightsUnavailableError(OSError):
  """A published file is not cached and cannot be fetched."""


def is_name(source) -> bool:
  """Whether a source is `<collection>:<name>` (not a path or URL)."""
  m = _SCHEME.match(str(source))
  return bool(m) and m.group(1) in COLLECTIONS


def model_of(collection: str, name: str) -> str:
  """The registry model of a published file name (checks the name)."""
  if collection == 'augreg':
    model = name.split('-')[0]
    try:
      return registry.canonical_name(model)
    except KeyError as e:
      raise ValueError(
        f'augreg:{name}: {model!r} is not an AugReg model ({e}). '
        f'Recommended files: {", ".join(AUGREG_RECOMMENDED)}.'
      ) from e
  if name not in ORIGINAL[collection]:
    raise ValueError(
      f'{collection}:{name} is not a published file; {collection} has '
      f'{", ".join(ORIGINAL[collection])}.'
    )
  return registry.canonical_name(name.removesuffix('-224'))


def cache_dir(weights_cache: str | None = None) -> epath.Path:
  """Where fetched files live: the argument, $VIT_JAX_WEIGHTS or default."""
  directory = weights_cache or os.environ.get(ENV) or DEFAULT_CACHE
  return epath.Path(os.path.expanduser(directory))


def url(collection: str, name: str) -> str:
  return f'{BUCKET}/{collection}/{name}.npz'


def _copy(source: epath.Path, destination: epath.Path) -> None:
  source.copy(destination, overwrite=True)


def _probe(source: epath.Path) -> bool:
  return source.exists()


def _fetch(source: epath.Path, destination: epath.Path) -> None:
  """Copies a remote file; fails within PROBE_TIMEOUT if unreachable."""
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  try:
    exists = pool.submit(_probe, source).result(timeout=PROBE_TIMEOUT)
  except concurrent.futures.TimeoutError as e:
    raise TimeoutError(f'no answer in {PROBE_TIMEOUT:g} s') from e
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
  if not exists:
    raise FileNotFoundError('no such file in the bucket')
  destination.parent.mkdir(parents=True, exist_ok=True)
  partial = destination.parent / f'.{destination.name}.partial'
  _copy(source, partial)
  partial.rename(destination)


def resolve(source: str, weights_cache: str | None = None) -> epath.Path:
  """The local file of `<collection>:<name>`, fetched if not cached.

  Raises:
    ValueError: an unknown collection or name.
    WeightsUnavailableError: not cached and the bucket is unreachable; the
      message names the URL and the path to put the file at.
  """
  collection, name = _SCHEME.match(source).groups()
  name = name.removesuffix('.npz')
  model_of(collection, name)
  local = cache_dir(weights_cache) / collection / f'{name}.npz'
  if local.exists():
    return local
  remote = url(collection, name)
  try:
    _fetch(epath.Path(remote), local)
  except Exception as e:  # Any client's failure means the same to the user.
    raise WeightsUnavailableError(
      f'Could not fetch {remote} ({type(e).__name__}: {e}). Download it '
      f'(https://storage.googleapis.com/{remote[len("gs://") :]}) and put '
      f'it at {local}, or set --config.weights_cache / ${ENV} to the '
      'directory that holds it.'
    ) from e
  return local

"""One training run per workdir at a time.

Two runs writing one workdir would interleave their metrics and race on the
same checkpoint steps. The first run holds an exclusive `fcntl.flock` on
`<workdir>/.lock` and writes its pid and host there; a second one fails at
once, naming them. The kernel releases the lock when its holder exits or is
killed, so a crashed run never leaves the workdir locked; the file itself
stays, with stale contents that nothing reads as a lock.

Only process 0 of a multi-host run locks. Paths that are not local files
(gs://, s3://) cannot be locked this way and are not.
"""

import contextlib
import datetime
import fcntl
import os
import socket
from collections.abc import Iterator

import jax
from etils import epath

LOCK_FILE = '.lock'


class WorkdirLockedError(RuntimeError):
  """Another process is running in the workdir."""


def _holder(path: epath.Path) -> str:
  try:
    text = path.read_text().strip()
  except OSError:
    text = ''
  return text or 'another process (it wrote no pid)'


@contextlib.contextmanager
def locked(workdir: str | epath.Path) -> Iterator[None]:
  """Holds the workdir's lock for the duration of the block.

  Raises:
    WorkdirLockedError: another live process holds it.
  """
  workdir = epath.Path(workdir)
  if jax.process_index() != 0 or '://' in str(workdir):
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirLockedError(
        f'{workdir} is in use by {_holder(path)}. Wait for that run to '
        'finish (or stop it), or use another --workdir.'
      ) from None
    since = datetime.datetime.now().isoformat(timespec='seconds')
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on host {socket.gethostname()} since {since}\n')
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)

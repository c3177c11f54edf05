"""How checkpoint faults are reported: errors that name the step and path.

A damaged step, a failed asynchronous save: each gets an error of its own
that says what to do, rather than a library's internal exception.
"""

import logging
import shutil
import sys

from etils import epath


class CheckpointRestoreError(RuntimeError):
  """No checkpoint step of a directory restores."""


class CheckpointSaveError(OSError):
  """An asynchronous checkpoint save failed (e.g. the disk is full)."""


class _DropUnretrievedReads(logging.Filter):
  """Drops asyncio's reports of the other reads of a failed restore."""

  def filter(self, record):
    message = record.getMessage()
    return not (
      message.startswith('Task exception was never retrieved')
      and 'async_deserialize' in message
    )


def drop_echoes_of_a_failed_read() -> None:
  """Silences the echoes of a failed checkpoint read, once per process.

  When one array of a checkpoint fails to read, orbax closes its event loop
  while tensorstore still completes the other reads: each then reports
  'Event loop is closed' as an unraisable exception, or asyncio logs its
  failed task ('Task exception was never retrieved'), hundreds of
  tracebacks that would bury the one real cause (which is reported).
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_reports', False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
      return
    previous(unraisable)

  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(_DropUnretrievedReads())


def free_space(directory: epath.Path) -> str:
  try:
    free = shutil.disk_usage(directory).free
  except OSError:  # Not a local path, or it is gone.
    return 'free space unknown'
  return f'{free / 2**20:.1f} MiB free'

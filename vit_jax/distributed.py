"""Joining the processes of a multi-host run, and XLA:CPU's flags for it.

`initialize` picks how the processes find each other: explicit flags
(coordinator address, process count and index), or else an Open MPI job
(`mpirun`), a Slurm job step (`srun`) or a Cloud TPU pod of more than one
process, which `jax.distributed.initialize()` reads from the environment
(the variables below are the ones its cluster detection requires). With none
of these the run is a single process.
"""

import os

import jax
from absl import logging

# XLA:CPU aborts the process when the devices of a collective (an
# all-reduce among a process's host devices) have not all arrived this many
# seconds after its 20 s "may be stuck" warning. XLA's default, 40 s, is
# reached by a merely slow, overloaded machine.
CPU_COLLECTIVE_TIMEOUT_FLAG = (
  '--xla_cpu_collective_call_terminate_timeout_seconds'
)
CPU_COLLECTIVE_TIMEOUT_SECONDS = 600

# What jax._src.clusters.slurm_cluster needs: set by `srun` in each task.
SLURM_VARIABLES = (
  'SLURM_JOB_ID',
  'SLURM_STEP_NODELIST',
  'SLURM_NTASKS',
  'SLURM_PROCID',
  'SLURM_LOCALID',
)
# jax._src.clusters.ompi_cluster: set by Open MPI's `mpirun`/`mpiexec`.
OPEN_MPI_URI = 'OMPI_MCA_orte_hnp_uri'
OPEN_MPI_SIZE = 'OMPI_COMM_WORLD_SIZE'


def set_cpu_collective_timeout(seconds=CPU_COLLECTIVE_TIMEOUT_SECONDS):
  """Raises XLA:CPU's collective timeout, unless XLA_FLAGS already sets it.

  Takes effect only before jax initialises its CPU backend (the first device
  query or computation). No effect on accelerators.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if CPU_COLLECTIVE_TIMEOUT_FLAG not in flags:
    os.environ['XLA_FLAGS'] = (
      f'{flags} {CPU_COLLECTIVE_TIMEOUT_FLAG}={seconds}'.strip()
    )


def _launcher(environ):
  """The launcher that started several processes, or None.

  In the order of jax's own detection (Open MPI, Slurm, Cloud TPU), so that
  the one named is the one `jax.distributed.initialize()` uses.
  """
  open_mpi_size = int(environ.get(OPEN_MPI_SIZE, '1'))
  if OPEN_MPI_URI in environ:
    return 'Open MPI' if open_mpi_size > 1 else None
  # A batch script outside `srun` is one process, whatever SLURM_NTASKS says:
  # SLURM_STEP_NODELIST exists only in a job step.
  slurm = all(name in environ for name in SLURM_VARIABLES)
  if slurm and int(environ['SLURM_NTASKS']) > 1:
    return 'Slurm'
  if open_mpi_size > 1:
    raise ValueError(
      f'{OPEN_MPI_SIZE}={open_mpi_size} but {OPEN_MPI_URI} is unset (an '
      'Open MPI without ORTE, such as 5.x), so jax cannot find the '
      'coordinator: pass --coordinator_address, --num_processes and '
      '--process_id.'
    )
  hosts = environ.get('TPU_PROCESS_ADDRESSES') or environ.get(
    'TPU_WORKER_HOSTNAMES', ''
  )
  if ',' in hosts:
    return 'Cloud TPU pod'
  return None


def initialize(coordinator_address=None, num_processes=None, process_id=None):
  """Joins the processes of a multi-host run (before any computation).

  Args:
    coordinator_address: host:port of process 0, or None to rely on the
      environment.
    num_processes: the number of processes (with `coordinator_address`).
    process_id: this process's index (with `coordinator_address`).

  Returns:
    How the processes were joined ('flags', 'Cloud TPU pod', 'Slurm',
    'Open MPI'), or None for a single-process run.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(value is not None for value in explicit):
    if any(value is None for value in explicit):
      raise ValueError(
        'Pass all of --coordinator_address, --num_processes and '
        f'--process_id, or none of them; got {coordinator_address!r}, '
        f'{num_processes!r}, {process_id!r}.'
      )
    method = 'flags'
  else:
    method = _launcher(os.environ)
    if method is None:
      return None
  # Collectives between CPU processes (tests, CPU clusters); no effect on
  # accelerators.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if method == 'flags':
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()  # Discovered from the environment.
  logging.info('Joined the processes of a multi-host run via %s.', method)
  return method

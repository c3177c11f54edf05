"""How a run joins its processes, and XLA:CPU's collective timeout."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax._src import clusters

from vit_jax import distributed

ROOT = Path(__file__).resolve().parents[1]

# Every variable that can make a launcher visible, cleared before each test
# so that the machine running the tests does not leak into them.
LAUNCHER_VARIABLES = (
  *distributed.SLURM_VARIABLES,
  'SLURM_STEP_NUM_NODES',
  distributed.OPEN_MPI_URI,
  distributed.OPEN_MPI_SIZE,
  'OMPI_COMM_WORLD_RANK',
  'OMPI_COMM_WORLD_LOCAL_RANK',
  'TPU_WORKER_HOSTNAMES',
  'TPU_PROCESS_ADDRESSES',
)


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize and config updates, runs neither."""
  for name in LAUNCHER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  recorded = {'initialize': [], 'config': []}
  monkeypatch.setattr(
    jax.distributed,
    'initialize',
    lambda *args, **kwargs: recorded['initialize'].append((args, kwargs)),
  )
  monkeypatch.setattr(
    jax.config,
    'update',
    lambda name, value: recorded['config'].append((name, value)),
  )
  return recorded


def set_slurm(monkeypatch, ntasks):
  """The variables `srun` sets in each task of a job step."""
  monkeypatch.setenv('SLURM_JOB_ID', '4242')
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'node[001-002]')
  monkeypatch.setenv('SLURM_NTASKS', str(ntasks))
  monkeypatch.setenv('SLURM_PROCID', '0')
  monkeypatch.setenv('SLURM_LOCALID', '0')
  monkeypatch.setenv('SLURM_STEP_NUM_NODES', str(ntasks))


def set_open_mpi(monkeypatch, size):
  """The variables Open MPI's `mpirun` sets in each process."""
  monkeypatch.setenv(
    distributed.OPEN_MPI_URI, '1234.0;tcp://10.0.0.1,10.0.0.2:5555'
  )
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', str(size))
  monkeypatch.setenv('OMPI_COMM_WORLD_RANK', '0')
  monkeypatch.setenv('OMPI_COMM_WORLD_LOCAL_RANK', '0')


def test_slurm_with_two_tasks_lets_jax_read_the_environment(calls, monkeypatch):
  set_slurm(monkeypatch, ntasks=2)
  # JAX's own Slurm detection sees the same job, so initialize() with no
  # arguments finds it.
  assert clusters.SlurmCluster.is_env_present()
  assert clusters.SlurmCluster.get_process_count() == 2
  assert distributed.initialize() == 'Slurm'
  assert calls['initialize'] == [((), {})]
  assert calls['config'] == [('jax_cpu_collectives_implementation', 'gloo')]


def test_single_task_slurm_stays_one_process(calls, monkeypatch):
  set_slurm(monkeypatch, ntasks=1)
  assert distributed.initialize() is None
  assert calls == {'initialize': [], 'config': []}


def test_slurm_batch_script_outside_srun_stays_one_process(calls, monkeypatch):
  # sbatch --ntasks=4 runs its script once; only srun starts the 4 tasks.
  set_slurm(monkeypatch, ntasks=4)
  monkeypatch.delenv('SLURM_STEP_NODELIST')
  assert not clusters.SlurmCluster.is_env_present()
  assert distributed.initialize() is None
  assert calls['initialize'] == []


def test_open_mpi_lets_jax_read_the_environment(calls, monkeypatch):
  set_open_mpi(monkeypatch, size=4)
  assert clusters.OmpiCluster.is_env_present()
  assert clusters.OmpiCluster.get_process_count() == 4
  assert distributed.initialize() == 'Open MPI'
  assert calls['initialize'] == [((), {})]


def test_open_mpi_comes_before_slurm_as_in_jax(calls, monkeypatch):
  # mpirun inside a Slurm job step: jax's detection takes Open MPI first.
  set_slurm(monkeypatch, ntasks=2)
  set_open_mpi(monkeypatch, size=4)
  detected = next(
    cluster
    for cluster in clusters.ClusterEnv._cluster_types
    if not cluster.opt_in_only_method and cluster.is_env_present()
  )
  assert detected is clusters.OmpiCluster
  assert distributed.initialize() == 'Open MPI'
  assert calls['initialize'] == [((), {})]


def test_open_mpi_without_its_coordinator_uri_asks_for_flags(
  calls, monkeypatch
):
  set_open_mpi(monkeypatch, size=4)
  monkeypatch.delenv(distributed.OPEN_MPI_URI)
  with pytest.raises(ValueError, match='--coordinator_address'):
    distributed.initialize()
  assert calls['initialize'] == []


def test_single_process_open_mpi_stays_one_process(calls, monkeypatch):
  set_open_mpi(monkeypatch, size=1)
  assert distributed.initialize() is None
  assert calls['initialize'] == []


def test_cloud_tpu_pod(calls, monkeypatch):
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'host-0,host-1')
  assert distributed.initialize() == 'Cloud TPU pod'
  assert calls['initialize'] == [((), {})]


def test_single_cloud_tpu_host_stays_one_process(calls, monkeypatch):
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'host-0')
  assert distributed.initialize() is None
  assert calls['initialize'] == []


def test_explicit_flags_win_over_the_environment(calls, monkeypatch):
  set_slurm(monkeypatch, ntasks=2)
  assert distributed.initialize('10.0.0.1:1234', 2, 1) == 'flags'
  assert calls['initialize'] == [(('10.0.0.1:1234', 2, 1), {})]
  assert calls['config'] == [('jax_cpu_collectives_implementation', 'gloo')]


def test_incomplete_flags_are_an_error(calls):
  with pytest.raises(ValueError, match='--num_processes'):
    distributed.initialize('10.0.0.1:1234', None, 0)
  assert calls['initialize'] == []


def test_nothing_set_stays_one_process(calls):
  assert distributed.initialize() is None
  assert calls == {'initialize': [], 'config': []}


def test_collective_timeout_is_added_unless_set(monkeypatch):
  flag = distributed.CPU_COLLECTIVE_TIMEOUT_FLAG
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  distributed.set_cpu_collective_timeout()
  assert os.environ['XLA_FLAGS'] == f'{flag}=600'

  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  distributed.set_cpu_collective_timeout()
  assert os.environ['XLA_FLAGS'].split() == [
    '--xla_force_host_platform_device_count=2',
    f'{flag}=600',
  ]

  monkeypatch.setenv('XLA_FLAGS', f'{flag}=5')  # the user's choice stays
  distributed.set_cpu_collective_timeout()
  assert os.environ['XLA_FLAGS'] == f'{flag}=5'


def test_the_test_environment_has_a_long_collective_timeout():
  # conftest.py sets it for this process, the pytest-xdist workers and the
  # main.py runs the tests start (they inherit os.environ).
  flags = dict(
    flag.partition('=')[::2] for flag in os.environ['XLA_FLAGS'].split()
  )
  assert int(flags[distributed.CPU_COLLECTIVE_TIMEOUT_FLAG]) >= 600


# One of two host devices reaches an all-reduce SKEW seconds after the
# other, as on an overloaded machine. XLA:CPU waits the warning timeout
# (shortened here to 1 s), then the termination timeout, then aborts.
SKEWED_ALL_REDUCE = """
import os, sys, time
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from vit_jax import distributed

distributed.set_cpu_collective_timeout()  # as main.py does
SKEW = float(sys.argv[1])

def late_on_device_0(index, x):
  if int(index) == 0:
    time.sleep(SKEW)
  return x

def all_reduce(x):
  index = jax.lax.axis_index('i')
  shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
  x = jax.pure_callback(late_on_device_0, shape, index, x)
  return jax.lax.psum(x, 'i')

mesh = jax.make_mesh((2,), ('i',))
x = jax.device_put(jnp.arange(2.0), NamedSharding(mesh, P('i')))
step = jax.jit(jax.shard_map(all_reduce, mesh=mesh, in_specs=P('i'),
                             out_specs=P()))
print('sum', float(step(x)[0]))
print('XLA_FLAGS', os.environ['XLA_FLAGS'])
"""


def run_skewed_all_reduce(xla_flags, skew_seconds):
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, '-c', SKEWED_ALL_REDUCE, str(skew_seconds)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_a_late_device_outlasting_a_short_timeout_aborts():
  # The user's own (short) timeout is kept, and it is this flag that
  # governs the abort the tests and CPU runs must not die of.
  flag = distributed.CPU_COLLECTIVE_TIMEOUT_FLAG
  result = run_skewed_all_reduce(
    '--xla_force_host_platform_device_count=2 '
    f'--xla_cpu_collective_call_warn_stuck_timeout_seconds=1 {flag}=1',
    skew_seconds=6,
  )
  assert result.returncode != 0
  assert 'Termination timeout for `all reduce' in result.stderr


def test_the_timeout_main_sets_is_accepted_and_outlasts_a_late_device():
  # Without a timeout in XLA_FLAGS, set_cpu_collective_timeout adds 600 s;
  # this jaxlib accepts the flag (an unknown one would abort at start-up).
  result = run_skewed_all_reduce(
    '--xla_force_host_platform_device_count=2 '
    '--xla_cpu_collective_call_warn_stuck_timeout_seconds=1',
    skew_seconds=6,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'sum 1.0' in result.stdout
  flag = distributed.CPU_COLLECTIVE_TIMEOUT_FLAG
  assert f'{flag}=600' in result.stdout

"""Entry point: `python main.py --config=configs/vit_b16.py --workdir=DIR`.

The config's `job` picks what runs; every config key can be overridden on
the command line (`--config.batch_size=256`). On several hosts, processes
launched on a Cloud TPU pod, by Slurm's `srun` or by Open MPI's `mpirun`
find each other; elsewhere pass --coordinator_address, --num_processes and
--process_id to every process (vit_jax/distributed.py).

Exit status: 0 when the job is done (or was already done: a finished
workdir is left as it is); 75 (EX_TEMPFAIL of sysexits.h) when SIGTERM
stopped training after saving a checkpoint, so that a scheduler restarts it
and the rerun resumes; 1 on an error, with its cause (an invalid config is
reported before any work, naming the key).
"""

import importlib
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax import config_checks, distributed, loop, metric_logging

# config.job -> vit_jax.jobs.<job>, whose `run(config, workdir)` does it.
JOBS = (
  'pretrain',
  'finetune',
  'vtab',
  'export',
  'benchmark',
  'evaluate',
  'fewshot',
  'inspect',
  'predict',
  'flops',
)

# sysexits.h's EX_TEMPFAIL: stopped by SIGTERM with a checkpoint; rerun.
EXIT_PREEMPTED = 75

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'A config file in configs/, with an optional :argument.'
)
flags.DEFINE_string('workdir', None, 'Where the job writes everything.')
flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0 (multi-host runs).'
)
flags.DEFINE_integer('num_processes', None, 'Number of processes.')
flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.DEFINE_string(
  'compilation_cache',
  os.path.expanduser('~/.cache/vit_jax/xla'),
  'Persistent XLA compilation cache directory; empty to disable.',
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if config.job not in JOBS:
    raise app.UsageError(
      f'config.job={config.job!r}; use one of {sorted(JOBS)}.'
    )
  try:
    config_checks.validate(config)
  except config_checks.ConfigError as e:
    sys.exit(str(e))  # Status 1; the keys to fix, without a traceback.
  # Before jax initialises its CPU backend, which reads XLA_FLAGS.
  distributed.set_cpu_collective_timeout()
  metric_logging.quiet_library_logs()
  if FLAGS.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache)
  distributed.initialize(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
  )
  logging.info(
    'Process %d of %d; %d %s devices.',
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
    jax.default_backend(),
  )
  job = importlib.import_module(f'vit_jax.jobs.{config.job}')
  results = job.run(config, FLAGS.workdir)
  if isinstance(results, dict) and loop.PREEMPTED in results:
    logging.warning(
      'Exiting with status %d (EX_TEMPFAIL): stopped by SIGTERM at step %d, '
      'which is saved. Rerun the same command to resume.',
      EXIT_PREEMPTED,
      results[loop.PREEMPTED],
    )
    sys.exit(EXIT_PREEMPTED)


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  app.run(main)

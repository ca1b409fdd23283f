"""python -m concept_jax.main --config configs/NAME.py[:key=value,...] --workdir DIR"""
from absl import app, flags, logging
from ml_collections import config_flags

from concept_jax import distributed, experiment

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, with optional :key=value arguments.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and results go.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'host:port of process 0 (multi-process).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Number of processes (multi-process).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process (multi-process).')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                                 "jax.distributed: 'auto' starts it when a coordinator is given.")
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every save step at INFO; --verbosity=0 brings that back.
    logging.set_verbosity(logging.WARNING)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
  experiment.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)

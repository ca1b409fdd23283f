"""Multi-host start-up and the device mesh.

One process per host (TPU VM, or GPU node with all its GPUs), or one per GPU under SLURM. The mesh has a
single 'data' axis over every device of every process; the batch is sharded on it and the model state
is replicated, so the compiled step is the same program on 1 CPU, 8 GPUs or a TPU pod.
"""
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1,
               mode: str = 'auto') -> None:
  """Starts jax.distributed when this is a multi-process run.

  mode 'off': never. 'on': always; arguments left empty are detected by JAX (TPU pods, SLURM, ...).
  'auto' (default): when a coordinator address is given, by flag or JAX_COORDINATOR_ADDRESS.
  Must run before anything touches a device.

  When all three are given (flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID),
  JAX's cluster detection is switched off: under SLURM it would otherwise restrict every process to
  the single GPU numbered SLURM_LOCALID, which is wrong for one process per node and for tasks whose
  GPUs srun already bound. A process then uses every device it sees; CUDA_VISIBLE_DEVICES (or
  JAX_LOCAL_DEVICE_IDS) chooses them. CPU processes exchange data through gloo, JAX's default
  cross-process CPU collectives (jax_cpu_collectives_implementation), so nothing is needed for them.
  """
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  if mode == 'off' or (mode == 'auto' and not coordinator_address):
    return
  kwargs = {}
  if coordinator_address:
    kwargs['coordinator_address'] = coordinator_address
  num_processes = num_processes or int(os.environ.get('JAX_NUM_PROCESSES', 0))
  if num_processes:
    kwargs['num_processes'] = num_processes
  process_id = process_id if process_id >= 0 else int(os.environ.get('JAX_PROCESS_ID', -1))
  if process_id >= 0:
    kwargs['process_id'] = process_id
  if len(kwargs) == 3:  # all given: nothing to detect (see the docstring)
    kwargs['cluster_detection_method'] = 'deactivate'
  jax.distributed.initialize(**kwargs)


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (all processes), axis 'data'."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict, mesh: Mesh) -> dict:
  """This process's rows of a batch (numpy) -> global jax.Arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Returns this process's share of the global batch; explains what to change when it does not divide."""
  devices, processes = mesh.devices.size, jax.process_count()
  if global_batch_size % devices:
    raise ValueError(f'batch_size={global_batch_size} must be a multiple of the number of devices '
                     f'({devices}); set batch_size to e.g. {devices * max(1, global_batch_size // devices)}.')
  return global_batch_size // processes


def put_replicated(tree, mesh: Mesh):
  """Host values (identical on every process) -> jax.Arrays replicated over the mesh."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)

"""Distribution: the tf.distribute strategy a run trains under.

Design notes: ARCHITECTURE.md, "Module notes", `distribute.py`.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import zlib
from typing import Dict, Optional

import tensorflow as tf
from absl import logging

from tf_finetune.config import Config, UserError

TF_CONFIG = "TF_CONFIG"
# The jobs that train; an "evaluator" or "ps" task is not a training replica.
_TRAINING_JOBS = ("chief", "worker")


class ClusterError(UserError):
  """A multi-worker run cannot go on: TF_CONFIG is wrong or a peer failed."""


# ---------------------------------------------------------------- TF_CONFIG


def read_tf_config() -> Optional[Dict]:
  """The parsed `TF_CONFIG` environment variable, or None when unset/empty."""
  raw = os.environ.get(TF_CONFIG, "").strip()
  if not raw:
    return None
  try:
    tf_config = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ClusterError(f"{TF_CONFIG} is not valid JSON ({e}).") from e
  cluster = tf_config.get("cluster", {}) if isinstance(tf_config, dict) else 0
  if not (isinstance(cluster, dict)
          and all(isinstance(hosts, list) for hosts in cluster.values())
          and isinstance(tf_config.get("task", {}), dict)):
    raise ClusterError(
        f"{TF_CONFIG} must be a JSON object whose 'cluster' maps job names to "
        f"lists of host:port and whose 'task' names this machine's job and "
        f"index; got {raw[:300]!r}.")
  return tf_config


def count_training_tasks(tf_config: Optional[Dict]) -> int:
  """Chief plus worker tasks in TF_CONFIG's cluster (0 without TF_CONFIG)."""
  cluster = (tf_config or {}).get("cluster") or {}
  return sum(len(cluster.get(job) or ()) for job in _TRAINING_JOBS)


def resolve_strategy_name(name: str, tf_config: Optional[Dict],
                          num_gpus: int) -> str:
  """`auto` -> the concrete strategy name; other names unchanged."""
  if name != "auto":
    return name
  if count_training_tasks(tf_config) > 1:
    return "multi_worker"
  return "mirrored" if num_gpus > 1 else "one_device"


def is_chief(strategy_name: str) -> bool:
  """False only for a non-chief task of a multi-worker run.

  The chief is the `chief` task, or worker 0 when the cluster has no chief
  (TensorFlow's rule). Reads TF_CONFIG only: callable before TensorFlow
  starts, e.g. to decide who writes `flags.cfg`.
  """
  tf_config = read_tf_config()
  # The GPU count only matters between mirrored and one_device: both chief.
  if (resolve_strategy_name(strategy_name, tf_config, 0) != "multi_worker"
      or count_training_tasks(tf_config) < 2):
    return True  # Trains alone (a missing cluster fails in create_strategy).
  task = (tf_config or {}).get("task") or {}
  cluster = (tf_config or {}).get("cluster") or {}
  if "chief" in cluster:
    return task.get("type") == "chief"
  return task.get("type") == "worker" and task.get("index", 0) == 0


def _check_cluster(tf_config: Optional[Dict]) -> None:
  """Raises ClusterError unless TF_CONFIG names this task in a real cluster."""
  example = ('e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", '
             '"host2:12345"]}, "task": {"type": "worker", "index": 0}}\'')
  if count_training_tasks(tf_config) < 2:
    raise ClusterError(
        f"--strategy=multi_worker needs {TF_CONFIG} naming a cluster of at "
        f"least two chief/worker tasks and this machine's task, {example}; "
        f"got {json.dumps(tf_config)}.")
  task = tf_config.get("task") or {}
  tasks = (tf_config["cluster"].get(task.get("type")) or ())
  index = task.get("index")
  if (task.get("type") not in _TRAINING_JOBS or not isinstance(index, int)
      or not 0 <= index < len(tasks)):
    raise ClusterError(
        f"{TF_CONFIG}: 'task' must name this machine's chief or worker "
        f"entry of the cluster, {example}; got task={json.dumps(task)}.")


# ---------------------------------------------------------------- strategy


def split_cpu(num_devices: int) -> None:
  """Splits the CPU into `num_devices` logical devices (0: leave it whole).

  Lets `mirrored` run, and be tested, on a machine without GPUs. Must run
  before TensorFlow initialises its devices, i.e. before any op executes.
  """
  if num_devices <= 0:
    return
  cpu = tf.config.list_physical_devices("CPU")[0]
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
  except RuntimeError as e:
    raise UserError(
        f"--virtual_cpu_devices={num_devices}: TensorFlow has already "
        f"initialised its devices ({e}); set it before anything runs.") from e


def create_strategy(name: str, virtual_cpu_devices: int = 0):
  """Returns the tf.distribute strategy for `--strategy=name`.

  Call it first thing: splitting the CPU and joining a multi-worker cluster
  both have to happen before TensorFlow runs any op.

  Raises:
    UserError: `multi_worker` without a usable TF_CONFIG, or with
      `--virtual_cpu_devices` (each worker trains on its own devices).
  """
  tf_config = read_tf_config()
  num_gpus = len(tf.config.list_physical_devices("GPU"))
  name = resolve_strategy_name(name, tf_config, num_gpus)
  if name == "multi_worker":
    strategy = _create_multi_worker_strategy(tf_config, virtual_cpu_devices)
  else:
    if count_training_tasks(tf_config) > 1:
      logging.warning("%s names a cluster, but --strategy=%s trains on this "
                      "machine alone.", TF_CONFIG, name)
    split_cpu(virtual_cpu_devices)
    strategy = _create_local_strategy(name)
  logging.info("Strategy %s with %d replica(s).", type(strategy).__name__,
               strategy.num_replicas_in_sync)
  return strategy


def _create_local_strategy(name: str):
  gpus = tf.config.list_logical_devices("GPU")
  if name == "mirrored":
    devices = [d.name for d in gpus] or [
        d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)
  if name == "one_device":
    # TensorFlow's default strategy: ops go to the first GPU, else the CPU,
    # and Keras takes its plain `fit` path. Under OneDeviceStrategy("/cpu:0")
    # a finetune epoch of ResNet50 at 64 px took 1.6-2x as long on this CPU
    # (BUILD_NOTES.md, "Speed switches").
    return tf.distribute.get_strategy()
  raise UserError(f"--strategy={name!r}: not supported.")


def _create_multi_worker_strategy(tf_config, virtual_cpu_devices: int):
  """MultiWorkerMirroredStrategy over TF_CONFIG's cluster.

  Blocks until every task of the cluster has started. A peer that dies later
  is detected by the coordination service TensorFlow starts with this
  strategy (its heartbeat), which aborts the pending collectives on every
  other worker; no collective timeout is set, since a worker legitimately
  waits a minute or more while another traces a train step.
  """
  if virtual_cpu_devices:
    raise UserError(
        f"--virtual_cpu_devices={virtual_cpu_devices}: only for "
        "--strategy=mirrored; multi_worker uses each worker's own GPUs, or "
        "its CPU.")
  _check_cluster(tf_config)
  install_keras_multi_worker_fix()
  return tf.distribute.MultiWorkerMirroredStrategy()


def is_multi_worker(strategy) -> bool:
  """True for a MultiWorkerMirroredStrategy spanning more than one worker."""
  # pylint: disable=protected-access
  # Keras gates its multi-worker code paths on exactly this test.
  return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
          and strategy.extended._in_multi_worker_mode())


def padded_count(num_examples: int, batch_size: int, replicas: int) -> int:
  """Examples in a split's batches once `pad_batches` has padded them."""
  def round_up(count):
    return -(-count // replicas) * replicas
  full, last = divmod(num_examples, batch_size)
  return full * round_up(batch_size) + (round_up(last) if last else 0)


def pad_batches(dataset: Optional[tf.data.Dataset], replicas: int,
                num_examples: Optional[int] = None,
                batch_size: Optional[int] = None
                ) -> Optional[tf.data.Dataset]:
  """(x, y[, w]) batches -> (x, y, sample_weight) batches that split evenly.

  Workaround: tf.distribute gives each replica an equal part of every batch,
  so a batch with fewer examples than replicas leaves a replica an empty
  one, and on CPUs oneDNN's Conv2D fails on an empty batch ("Matrix
  size-incompatible"; BUILD_NOTES.md, "Workarounds"; no upstream issue
  found). Keras' first validation batch must also split evenly
  (keras-team/keras#19246). So every batch is padded with zero examples up
  to a multiple of `replicas`; they carry sample weight 0, which Keras'
  losses and weighted metrics ignore (ARCHITECTURE.md).

  The real examples are weighted so that Keras' averages stay those of the
  real examples. Keras divides a replica's weighted loss sum by its batch
  size, pads included, and its loss average weighs each replica batch by
  that size:
  - training (`num_examples` None): in a batch of n real examples padded to
    m, weight m / n, so a step's loss (and gradient) is the mean over its n
    examples, as on one device;
  - evaluation (`num_examples` and `batch_size` given): every real example
    weighs padded_count / num_examples, so the loss and the weighted
    accuracy over the split are the means over its real examples, each
    counted once.

  Per-example weights `w` already in the batches (class weights,
  weighting.py) are multiplied by these; pads get 0.

  Args:
    dataset: batches of (x, y) or (x, y, w); None passes through.
    replicas: the strategy's replicas in sync; with 1 nothing changes.
    num_examples: the split's size, for evaluation weights.
    batch_size: the split's batch size, with `num_examples`.
  """
  if dataset is None or replicas <= 1:
    return dataset
  scale = (None if num_examples is None else
           padded_count(num_examples, batch_size, replicas) / num_examples)

  def pad(x, y, *given):
    real = tf.shape(x)[0]
    pads = -real % replicas

    def extend(tensor):
      zeros = tf.zeros(tf.concat([[pads], tf.shape(tensor)[1:]], 0),
                       tensor.dtype)
      return tf.ensure_shape(tf.concat([tensor, zeros], 0),
                             [None, *tensor.shape[1:]])

    count = tf.cast(real, tf.float32)
    weight = ((count + tf.cast(pads, tf.float32)) / count if scale is None
              else tf.constant(scale, tf.float32))
    weights = tf.fill([real], weight)
    if given:
      weights *= tf.cast(given[0], tf.float32)
    return extend(x), extend(y), extend(weights)

  return dataset.map(pad, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=True)


# ---------------------------------------------------------------- outputs


def writes_outputs(strategy) -> bool:
  """True unless this is a non-chief worker of a multi-worker run."""
  return not is_multi_worker(strategy) or strategy.extended.should_checkpoint


def check_same_start(strategy, start: str, workdir: str) -> None:
  """Raises ClusterError unless every worker starts from the same point.

  Args:
    strategy: the run's strategy; anything but multi-worker passes.
    start: where this worker starts, e.g. "no checkpoint".
    workdir: named in the error.

  Workers that resume from different checkpoints (or some from none: a
  workdir that is not shared) would run different steps and then hang or
  fail in a collective; this finds out before anything trains.
  """
  if not is_multi_worker(strategy):
    return
  local = tf.constant([zlib.crc32(start.encode())], tf.int64)

  @tf.function
  def gather():
    return strategy.run(lambda: tf.distribute.get_replica_context().all_gather(
        local, axis=0))

  starts = strategy.experimental_local_results(gather())[0].numpy()
  if len(set(starts.tolist())) > 1:
    resolver = strategy.cluster_resolver
    raise ClusterError(
        f"the workers would start from different points: "
        f"{resolver.task_type} {resolver.task_id} found {start} in "
        f"--workdir={workdir!r}, another worker did not. Every "
        "worker reads the chief's checkpoints from --workdir: give all of "
        "them the same --workdir on storage they share, then restart every "
        "worker.")


@contextlib.contextmanager
def chief_outputs(config: Config, strategy):
  """Yields the config to run with: writes go to the workdir on the chief only.

  Every worker of a multi-worker run executes the whole run (saving and
  evaluating involve collectives, so all must take part), but only the chief
  writes into `--workdir` and `--export_dir`. The others get a temporary
  folder instead, removed when the run ends, whether it succeeds or not.
  They still resume from the chief's checkpoints in `--workdir`: call
  `train.find_resume_state` with the config as given, before this.
  """
  if writes_outputs(strategy):
    yield config
    return
  resolver = strategy.cluster_resolver
  scratch = tempfile.mkdtemp(
      prefix=f"tf_finetune-{resolver.task_type}{resolver.task_id}-")
  logging.info("Not the chief: this worker writes to %s, removed at the end.",
               scratch)
  try:
    yield dataclasses.replace(config, workdir=scratch,
                              export_dir=os.path.join(scratch, "export"))
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


# Errors with which TensorFlow aborts collectives when a peer is gone.
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                tf.errors.AbortedError, tf.errors.CancelledError)


@contextlib.contextmanager
def explain_peer_failures(strategy):
  """Turns a peer's failure into a one-paragraph ClusterError.

  TensorFlow's own message starts with the op that saw the failure; the
  user needs to know that another worker died and what to do.
  """
  try:
    yield
  except _PEER_ERRORS as e:
    if not is_multi_worker(strategy):
      raise
    resolver = strategy.cluster_resolver
    raise ClusterError(
        f"multi-worker training stopped on {resolver.task_type} "
        f"{resolver.task_id}: another task of the cluster in {TF_CONFIG} "
        f"failed or became unreachable ({_describe(e)}). Check that task's "
        "log, then restart every worker.") from e


def _describe(error: tf.errors.OpError) -> str:
  """TensorFlow's message without the Python stack and op names it embeds."""
  noise = ("Graph execution error", "Detected at node", "Additional GRPC")
  lines = [line for line in error.message.splitlines()
           if line.strip() and not line[0].isspace()
           and not line.startswith(noise)]
  message = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]", "", " ".join(lines))
  return " ".join(message.split())[:400]


# ---------------------------------------------------------------- Keras fix
#
# Workaround for keras-team/keras#20585 (also tensorflow/tensorflow#72388):
# Keras 3.15.1's TensorFlow trainer cannot run `fit`/`evaluate` under a
# multi-worker MultiWorkerMirroredStrategy, for two reasons:
#
# 1. `TensorFlowTrainer._maybe_symbolic_build` takes the first distributed
#    batch and `strategy.reduce("MEAN", ...)`s it across replicas only to read
#    its shapes; across workers that reduce is a collective which fails on
#    the PerReplica batch ("Attempt to convert a value (PerReplica...)").
#    Fix: build from the first local replica's batch: same shapes and dtypes.
# 2. `reduce_per_replica` averages the step's metric results across workers
#    with `strategy.reduce("MEAN", v, axis=0)`; they are scalars, so it fails
#    ("Invalid reduction dimension 0 for input with 0 dimensions"). Fix: the
#    mean over replicas (axis=None), which is what Keras computes for one
#    worker's replicas (tf.reduce_mean over the stacked local results).
#
# Both replacements leave every other strategy on Keras' own code. Remove
# this section once a Keras release fixes #20585 (BUILD_NOTES.md says how to
# check).


def install_keras_multi_worker_fix() -> None:
  """Patches the two Keras internals above; idempotent."""
  # pylint: disable=protected-access,g-import-not-at-top
  from keras.src.backend.tensorflow import trainer
  if getattr(trainer, "_tf_finetune_multi_worker_fix", False):
    return
  build = trainer.TensorFlowTrainer._maybe_symbolic_build
  reduce_per_replica = trainer.reduce_per_replica

  def maybe_symbolic_build(self, iterator=None, data_batch=None):
    strategy = self.distribute_strategy
    if iterator is None or not is_multi_worker(strategy):
      return build(self, iterator=iterator, data_batch=data_batch)
    for _, _, batches in iterator:
      data_batch = tf.nest.map_structure(
          lambda v: (strategy.experimental_local_results(v)[0]
                     if isinstance(v, tf.distribute.DistributedValues) else v),
          next(batches))
      break
    return build(self, data_batch=data_batch)

  def reduce_across_workers(values, strategy, reduction):
    if reduction in ("auto", "mean") and is_multi_worker(strategy):
      return tf.nest.map_structure(
          lambda v: strategy.reduce("MEAN", v, axis=None), values)
    return reduce_per_replica(values, strategy, reduction)

  trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
  trainer.reduce_per_replica = reduce_across_workers
  trainer._tf_finetune_multi_worker_fix = True

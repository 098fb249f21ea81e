"""Distribution stage: the tf.distribute strategy a run trains under."""

import tensorflow as tf
from absl import logging

from tf_finetune.config import UserError


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

  `auto` mirrors over GPUs when there are several, else uses one device.
  """
  split_cpu(virtual_cpu_devices)
  gpus = tf.config.list_logical_devices("GPU")
  if name == "auto":
    name = "mirrored" if len(gpus) > 1 else "one_device"
  if name == "mirrored":
    devices = [d.name for d in gpus] or [
        d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
  elif name == "one_device":
    strategy = tf.distribute.OneDeviceStrategy(
        gpus[0].name if gpus else "/cpu:0")
  else:
    raise UserError(f"--strategy={name!r}: not supported.")
  logging.info("Strategy %s with %d replica(s).", type(strategy).__name__,
               strategy.num_replicas_in_sync)
  return strategy

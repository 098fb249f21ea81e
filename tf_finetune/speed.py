"""Speed switches: XLA, mixed precision, and the measures of a run's cost.

`resolve_switches` turns the user's `auto|true|false` style settings into
what this machine actually runs, and logs one line per decision, so a run's
log says why it was fast or slow. The decisions themselves are small pure
functions (`choose_jit_compile`, `choose_mixed_precision`) taking the device
facts as arguments, so they are testable on a machine without GPUs.

Figures behind the defaults are in BUILD_NOTES.md ("Speed switches").
"""

import contextlib
import dataclasses
import platform
import resource
import sys
from typing import Iterator, Optional, Sequence, Tuple

import keras
import tensorflow as tf
from absl import logging

from tf_finetune.config import Config


@dataclasses.dataclass(frozen=True)
class Switches:
  """What a run uses, after resolving "auto" on this machine.

  Attributes:
    jit_compile: XLA-compile the train steps.
    mixed_precision: Keras dtype policy name the model is built with.
    stage1_mode: "cached_features" (stage head trains on cached backbone
      features) or "images".
    feature_views: augmented views per training image in the feature cache
      (1 when stage 1 trains on images).
  """
  jit_compile: bool
  mixed_precision: str
  stage1_mode: str
  feature_views: int

  def describe(self) -> dict:
    """For report.json: the switches and the process's peak memory so far."""
    return {**dataclasses.asdict(self), "peak_rss_mb": peak_rss_mb()}


def resolve_switches(config: Config, strategy) -> Switches:
  """Resolves `config`'s speed settings for this machine, logging each.

  Args:
    config: the validated run configuration.
    strategy: the run's tf.distribute strategy (XLA stays off with several
      replicas under "auto", as Keras' own "auto" does).
  """
  gpus = tf.config.list_physical_devices("GPU")
  jit, why = choose_jit_compile(
      config.jit_compile, has_gpu=bool(gpus),
      replicas=strategy.num_replicas_in_sync,
      unsupported=xla_unsupported_reason(bool(gpus)))
  logging.info("XLA (--jit_compile=%s): %s, %s.", config.jit_compile,
               "on" if jit else "off", why)
  policy, why = choose_mixed_precision(config.mixed_precision,
                                       gpu_capabilities(gpus))
  logging.info("Precision (--mixed_precision=%s): %s, %s.",
               config.mixed_precision, policy, why)
  cached = config.caches_features
  logging.info("Stage head (--cache_features=%s): %s.", cached,
               describe_stage1(config))
  return Switches(jit_compile=jit, mixed_precision=policy,
                  stage1_mode="cached_features" if cached else "images",
                  feature_views=config.feature_views if cached else 1)


def describe_stage1(config: Config) -> str:
  """What stage head trains on, in words, for the log."""
  if not config.caches_features:
    return "trains on images" if config.head_epochs else "no stage head"
  if config.feature_views > 1:
    return (f"trains on cached backbone features of {config.feature_views} "
            f"augmented views of each image (--augment="
            f"{','.join(config.augment)})")
  if config.augment:
    return ("trains on cached backbone features of the un-augmented images; "
            f"--augment={','.join(config.augment)} applies in stage finetune "
            "(--feature_views=K caches K augmented views)")
  return "trains on cached backbone features of the images"


def choose_jit_compile(setting: str, has_gpu: bool, replicas: int = 1,
                       unsupported: Optional[str] = None) -> Tuple[bool, str]:
  """Decides XLA for a run; returns (on, reason).

  "auto" is on only on a single GPU. On these CPUs XLA compiles a ResNet50
  train step for minutes and then runs it slower than TensorFlow's oneDNN
  kernels at 64 px (BUILD_NOTES.md); Keras' own "auto" is off on CPUs and
  under tf.distribute too. "true" is honoured unless XLA is unsupported.
  """
  if setting == "false":
    return False, "as asked"
  if unsupported:
    return False, f"unsupported here: {unsupported}"
  if setting == "true":
    return True, "as asked"
  if not has_gpu:
    return False, ("CPU only: compiling costs more than it saves on a CPU "
                   "(BUILD_NOTES.md, Speed switches)")
  if replicas > 1:
    return False, f"{replicas} replicas: Keras keeps XLA off under tf.distribute"
  return True, "GPU"


def xla_unsupported_reason(has_gpu: bool) -> Optional[str]:
  """Why XLA cannot run on this machine, or None when it can."""
  if not tf.test.is_built_with_xla():
    return "this TensorFlow build has no XLA"
  # tensorflow-metal (Apple GPUs) has no XLA; Keras refuses it there too.
  if has_gpu and sys.platform == "darwin" and "arm" in platform.processor():
    return "Apple GPUs (tensorflow-metal) have no XLA"
  return None


def gpu_capabilities(gpus: Sequence) -> list:
  """Compute capability (major, minor) of each GPU; (0, 0) when unknown."""
  capabilities = []
  for gpu in gpus:
    details = tf.config.experimental.get_device_details(gpu)
    capabilities.append(tuple(details.get("compute_capability") or (0, 0)))
  return capabilities


def choose_mixed_precision(setting: str, capabilities: Sequence[Tuple[int, int]]
                           ) -> Tuple[str, str]:
  """Decides the dtype policy; returns (policy name, reason).

  "auto": mixed_float16 when every GPU has tensor cores (compute capability
  >= 7.0), else float32: CPUs, and older GPUs, gain nothing from float16.
  """
  if setting != "auto":
    if setting == "mixed_float16" and not capabilities:
      return setting, "as asked (slow on CPUs, which emulate float16 math)"
    return setting, "as asked"
  if capabilities and all(tuple(c) >= (7, 0) for c in capabilities):
    return "mixed_float16", "GPUs with compute capability >= 7.0"
  if capabilities:
    return "float32", "a GPU below compute capability 7.0 (no tensor cores)"
  return "float32", "CPU only"


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
  """Sets Keras' global dtype policy while models are built, then restores it.

  Layers take the global policy when they are created and keep it (also
  through saving and loading), so only building needs it: the process-wide
  setting does not leak into later models, tests or notebooks.
  """
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(name)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


def peak_rss_mb(usage=None) -> float:
  """Peak resident memory in MiB: of `usage` (a `resource.struct_rusage`,
  e.g. a child's from `os.wait4`), else of this process so far."""
  if usage is None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
  # Linux reports KiB, macOS bytes.
  return usage.ru_maxrss / ((1 << 20) if sys.platform == "darwin" else 1024)

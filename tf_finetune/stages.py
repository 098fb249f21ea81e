"""Stage plan and the callback that runs both stages.

Design notes: ARCHITECTURE.md, "Module notes", `stages.py`.
"""

import copy
import dataclasses
import math
import re
import time
from typing import Dict, List, Optional

import keras
from absl import logging

from tf_finetune import speed
from tf_finetune.config import RESNET50_BLOCKS, Config
from tf_finetune.model import get_backbone

HEAD = "head"
FINETUNE = "finetune"

_BLOCK_PATTERN = re.compile(r"^(conv\d_block\d+)_")


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """Which stage each epoch belongs to, and what each stage trains."""
  head_epochs: int
  finetune_epochs: int
  head_learning_rate: float
  finetune_learning_rate: float
  unfreeze_blocks: int
  label_smoothing: float = 0.0
  jit_compile: bool = False
  steps_per_epoch: int = 1
  lr_schedule: str = "constant"
  warmup_fraction: float = 0.0

  @classmethod
  def from_config(cls, config: Config, jit_compile: bool = False,
                  steps_per_epoch: int = 1) -> "StagePlan":
    """`jit_compile` is the resolved `--jit_compile` (speed.resolve_switches);
    `steps_per_epoch` the training batches per epoch (for the schedules)."""
    return cls(config.head_epochs,
               finetune_epochs(config.finetune_epochs,
                               config.finetune_min_steps, steps_per_epoch),
               config.head_learning_rate, config.finetune_learning_rate,
               config.unfreeze_blocks, config.label_smoothing, jit_compile,
               steps_per_epoch, config.lr_schedule, config.warmup_fraction)

  @property
  def total_epochs(self) -> int:
    return self.head_epochs + self.finetune_epochs

  def stage_at(self, epoch: int) -> str:
    """The stage of a 0-based epoch index."""
    return HEAD if epoch < self.head_epochs else FINETUNE

  def ends_stage(self, epoch: int) -> bool:
    """Whether a 0-based epoch is the last of its stage."""
    return (epoch + 1 == self.total_epochs
            or self.stage_at(epoch + 1) != self.stage_at(epoch))

  def epochs_of(self, stage: str) -> int:
    return self.head_epochs if stage == HEAD else self.finetune_epochs

  def learning_rate_of(self, stage: str) -> float:
    return (self.head_learning_rate if stage == HEAD
            else self.finetune_learning_rate)

  def schedule_of(self, stage: str):
    """The learning rate of `stage`: a float, or a per-step schedule.

    "cosine" decays the stage's rate to zero over its steps (Loshchilov &
    Hutter, SGDR, 2017): the last epochs take small steps around the
    optimum instead of jumping about it. Stage finetune first warms up
    linearly from zero over `warmup_fraction` of its steps (Goyal et al.,
    2017): a new Adam's first updates have full size on every weight,
    which would shake the pretrained blocks before its moment estimates
    settle. The optimizer of each stage is new, so its step count, which
    drives the schedule, starts at zero with the stage.
    """
    rate = self.learning_rate_of(stage)
    steps = self.epochs_of(stage) * self.steps_per_epoch
    if self.lr_schedule == "constant" or steps < 2:
      return rate
    warmup = (int(self.warmup_fraction * steps) if stage == FINETUNE else 0)
    if warmup == 0:
      return keras.optimizers.schedules.CosineDecay(rate, steps)
    return keras.optimizers.schedules.CosineDecay(
        0.0, steps - warmup, warmup_target=rate, warmup_steps=warmup)

  def unfrozen_blocks(self, stage: str) -> tuple:
    """Names of the residual blocks that train in `stage`, bottom to top."""
    if stage == HEAD or self.unfreeze_blocks == 0:
      return ()
    return RESNET50_BLOCKS[-self.unfreeze_blocks:]


def finetune_epochs(epochs: int, min_steps: int, steps_per_epoch: int) -> int:
  """Epochs of stage finetune: `epochs`, or enough to take `min_steps` steps.

  A step budget rather than an epoch count on small data follows BiT's
  HyperRule (Kolesnikov et al., 2020, section 3.3): a fixed number of steps
  below some data size, growing with the data above it, because a few
  hundred images give too few steps per epoch for the pretrained blocks to
  settle. No stage finetune (`epochs` 0) stays none.
  """
  if epochs == 0:
    return 0
  return max(epochs, math.ceil(min_steps / max(steps_per_epoch, 1)))


def block_of(layer_name: str) -> Optional[str]:
  """'conv5_block3_2_conv' -> 'conv5_block3'; stem and others -> None."""
  match = _BLOCK_PATTERN.match(layer_name)
  return match.group(1) if match else None


def set_backbone_trainable(backbone: keras.Model, blocks) -> None:
  """Makes exactly the non-BatchNorm layers of `blocks` trainable."""
  blocks = set(blocks)
  backbone.trainable = bool(blocks)
  for layer in backbone.layers:
    layer.trainable = (block_of(layer.name) in blocks and not isinstance(
        layer, keras.layers.BatchNormalization))


def compile_model(model: keras.Model, learning_rate,
                  label_smoothing: float = 0.0,
                  jit_compile: bool = False) -> None:
  """Compiles with a fresh Adam built on the current trainable variables;
  `learning_rate` is a float or a Keras schedule."""
  optimizer = keras.optimizers.Adam(learning_rate)
  model.compile(
      optimizer=optimizer,
      loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
      weighted_metrics=[accuracy_metric()], jit_compile=jit_compile)
  # Built here, eagerly and in the strategy scope, not lazily inside the
  # first traced train step. `model.optimizer`, not `optimizer`: under
  # mixed_float16 compile wraps it in a LossScaleOptimizer, whose own
  # variables (loss scale, step counter) need building too.
  model.optimizer.build(model.trainable_variables)


def accuracy_metric() -> keras.metrics.Metric:
  """The metric both stages report (labels are one-hot)."""
  return keras.metrics.CategoricalAccuracy(name="accuracy")


def apply_stage(model: keras.Model, plan: StagePlan, stage: str) -> None:
  """Freezes/unfreezes for `stage` and recompiles at its learning rate."""
  with model.distribute_strategy.scope():
    set_backbone_trainable(get_backbone(model), plan.unfrozen_blocks(stage))
    compile_model(model, plan.schedule_of(stage), plan.label_smoothing,
                  plan.jit_compile)
    model.make_train_function(force=True)


def count_trainable_params(model: keras.Model) -> int:
  return int(sum(v.numpy().size for v in model.trainable_variables))


@dataclasses.dataclass
class StageRecord:
  """What one stage did, for report.json and for the checkpoints.

  Attributes:
    name: HEAD or FINETUNE.
    epochs: the stage's planned epochs.
    learning_rate: its peak learning rate.
    unfrozen_blocks: the residual blocks it trains.
    trainable_params: how many weights it trains.
    input: "images" or "cached_features" (features.py).
    feature_cache: the feature cache's summary, when `input` is cached.
    probe: the probe head's grid and choice (probe.describe), when used.
    seconds: its wall time so far, every process up to its last checkpoint.
    images_per_second: throughput over the steps after each process's first
      (None before one).
    peak_rss_mb: the process's memory high-water mark at its last epoch.
    history: the Keras logs of its epochs, {key: [value per epoch]}.
    resumed_at: one {"epoch", "step"} per resumption inside the stage.
    elapsed: seconds counted before `started`, by earlier processes.
    started: `time.perf_counter()` when this process began counting the
      stage; None in a record read from a checkpoint.
    first_step_done: whether this process ran the stage's first (tracing)
      step.
    step_seconds: seconds of the steps counted in `images_per_second`.
    images: images of those steps.
  """
  name: str
  epochs: int
  learning_rate: float
  unfrozen_blocks: List[str]
  trainable_params: int
  input: str = "images"
  feature_cache: Optional[Dict] = None
  probe: Optional[Dict] = None
  seconds: float = 0.0
  images_per_second: Optional[float] = None
  peak_rss_mb: Optional[float] = None
  history: Dict[str, List[float]] = dataclasses.field(default_factory=dict)
  resumed_at: Optional[List[Dict]] = None
  elapsed: float = 0.0
  started: Optional[float] = None
  first_step_done: bool = False
  step_seconds: float = 0.0
  images: int = 0

  def seconds_until(self, now: float) -> float:
    """The stage's wall time up to `now` (a `time.perf_counter()`)."""
    return self.elapsed + (0.0 if self.started is None else now - self.started)

  def to_json(self) -> Dict:
    """report.json's entry of the stage; optional fields only when set."""
    entry = {}
    for name in _REPORT_FIELDS:
      value = getattr(self, name)
      if value is not None or name not in _OPTIONAL_FIELDS:
        entry[name] = value
    return entry

  def to_state(self) -> Dict:
    """The checkpoint's entry: `to_json` and the bookkeeping, under the
    keys checkpoint pointers have always had."""
    state = {k: v for k, v in self.to_json().items() if k != "resumed_at"}
    state.update({key: getattr(self, name)
                  for key, name in _STATE_KEYS.items()})
    if self.resumed_at is not None:
      state["resumed_at"] = self.resumed_at
    state["_elapsed"] = self.elapsed
    return state

  @classmethod
  def from_state(cls, entry: Dict) -> "StageRecord":
    """Reads `to_state`'s entry; raises KeyError or TypeError on another."""
    entry = dict(entry)
    private = {name: entry.pop(key) for key, name in _STATE_KEYS.items()}
    elapsed = entry.pop("_elapsed")
    return cls(**entry, **private, elapsed=elapsed)


_OPTIONAL_FIELDS = ("feature_cache", "probe", "resumed_at")
_REPORT_FIELDS = ("name", "epochs", "learning_rate", "unfrozen_blocks",
                  "trainable_params", "input", "feature_cache", "probe",
                  "seconds", "images_per_second", "peak_rss_mb", "history",
                  "resumed_at")
# Checkpoint keys of the bookkeeping fields, private to the callback.
_STATE_KEYS = {"_first_step_done": "first_step_done",
               "_step_seconds": "step_seconds", "_images": "images"}


class TwoStageCallback(keras.callbacks.Callback):
  """Switches from stage "head" to "finetune" at the planned epoch.

  Also records, per stage, what the report needs: epochs, learning rate,
  trainable parameters, seconds, images/second, peak memory and the Keras
  history, and logs a one-line summary when a stage ends.

  The stages may also come from two `fit` calls on models sharing the head
  (features.py: stage head on cached features, then stage finetune on
  images with `initial_epoch`); one callback instance then spans both.

  Args:
    plan: the stage plan.
    applied_stage: the stage the model was compiled for before `fit`.
    train_examples: training images per epoch (for images/second).
    batch_size: global batch size.
  """

  def __init__(self, plan: StagePlan, applied_stage: str,
               train_examples: int, batch_size: int):
    super().__init__()
    self.plan = plan
    self.stage = applied_stage
    self.train_examples = train_examples
    self.batch_size = batch_size
    self.records: List[StageRecord] = []
    self._batch_start = 0.0
    self._resume_note: Optional[Dict] = None  # See restore_records.
    self._early: Dict[str, tuple] = {}

  def start_stage_early(self, stage: str, started: float, **fields) -> None:
    """Counts work done before `stage`'s first epoch in its seconds.

    Args:
      stage: the stage the work belongs to.
      started: `time.perf_counter()` when that work began.
      **fields: extra report fields of the stage (e.g. how its input was
        made).
    """
    self._early[stage] = (started, fields)

  def on_epoch_begin(self, epoch, logs=None):
    stage = self.plan.stage_at(epoch)
    if self.records and self.records[-1].name == stage:
      return
    started = time.perf_counter()  # The switch itself counts in the stage.
    if stage != self.stage:
      apply_stage(self.model, self.plan, stage)
      self.stage = stage
    self._start_record(stage, started)

  def on_train_batch_begin(self, batch, logs=None):
    self._batch_start = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    record = self.records[-1]
    # The stage's first step includes graph tracing: throughput leaves it out.
    if record.first_step_done:
      record.step_seconds += time.perf_counter() - self._batch_start
      record.images += min(self.batch_size,
                           self.train_examples - batch * self.batch_size)
    record.first_step_done = True

  def on_epoch_end(self, epoch, logs=None):
    logs = logs if logs is not None else {}
    logs["learning_rate"] = float(keras.ops.convert_to_numpy(
        self.model.optimizer.learning_rate))
    record = self.records[-1]
    for key, value in logs.items():
      record.history.setdefault(key, []).append(float(value))
    record.seconds = record.seconds_until(time.perf_counter())
    if record.step_seconds > 0:
      record.images_per_second = record.images / record.step_seconds
    # A high-water mark of the whole process: the peak up to this stage.
    record.peak_rss_mb = speed.peak_rss_mb()
    if self.plan.ends_stage(epoch):
      log_stage_summary(record)

  def _start_record(self, stage: str, started: float) -> None:
    started, fields = self._early.pop(stage, (started, {}))
    self.records.append(StageRecord(
        name=stage, epochs=self.plan.epochs_of(stage),
        learning_rate=self.plan.learning_rate_of(stage),
        unfrozen_blocks=list(self.plan.unfrozen_blocks(stage)),
        trainable_params=count_trainable_params(self.model),
        started=started, **fields))
    if self._resume_note:
      self.records[-1].resumed_at = [self._resume_note]
      self._resume_note = None

  def stage_reports(self) -> List[Dict]:
    """report.json's "stages": the records without their bookkeeping."""
    return [r.to_json() for r in self.records]

  def records_state(self) -> List[StageRecord]:
    """Copies of the records for a checkpoint: each stage's seconds so far
    in `elapsed`, without this process's clock readings."""
    now = time.perf_counter()
    return [copy.deepcopy(dataclasses.replace(
        r, elapsed=r.seconds_until(now), started=None)) for r in self.records]

  def restore_records(self, records: List[StageRecord], epoch: int,
                      step: int) -> None:
    """Continues the records of a resumed run (from `records_state`).

    A stage's `seconds` and `images_per_second` then add up the time and
    images of every process up to its last checkpoint; work lost after that
    checkpoint is not counted. The stage the run resumes in gets
    `resumed_at`: one {"epoch", "step"} per resumption (0-based epoch, as in
    training.csv; steps already trained in it).
    """
    now = time.perf_counter()
    self.records = [copy.deepcopy(dataclasses.replace(
        r, started=now, first_step_done=False)) for r in records]
    note = {"epoch": epoch, "step": step}
    if self.records and self.records[-1].name == self.plan.stage_at(epoch):
      last = self.records[-1]
      last.resumed_at = [*(last.resumed_at or []), note]
    else:  # Resumed at the stage switch: the new stage's record gets it.
      self._resume_note = note


def log_stage_summary(record: StageRecord) -> None:
  """One log line per finished stage: time, throughput, memory, accuracy."""
  val = record.history.get("val_accuracy") or [float("nan")]
  ips = record.images_per_second
  logging.info(
      "Stage %s: %d epoch(s) in %.1f s on %s, %s images/s after the first "
      "step, peak RSS %.0f MB, val_accuracy %.4f.", record.name,
      len(record.history.get("loss", [])), record.seconds,
      record.input.replace("_", " "),
      "n/a" if ips is None else f"{ips:.0f}", record.peak_rss_mb, val[-1])

"""The run configuration: one frozen dataclass, validated once, at start.

`main.py` turns absl flags into a `Config`; every other module takes a
`Config` (or plain arguments), so each stage of the data flow is callable
from tests and notebooks without flags. All range and consistency checks
live in `Config.validate`, so a bad value fails before any expensive work.
"""

import dataclasses
import math
from typing import Dict, Optional, Tuple

# Residual blocks of ResNet50, bottom to top; `unfreeze_blocks` counts from
# the end of this list.
RESNET50_BLOCKS = tuple(
    f"conv{stage}_block{i}"
    for stage, count in ((2, 3), (3, 4), (4, 6), (5, 3))
    for i in range(1, count + 1))

MODES = ("train", "evaluate", "export", "predict", "tune")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
BACKBONES = ("resnet50",)
DATASET_SCHEMES = ("demo", "folder:", "tfds:")
TUNERS = ("hyperband", "bayesian", "random")
# What `model.fit` logs; the direction follows from the name (loss: min).
OBJECTIVES = ("val_accuracy", "val_loss", "accuracy", "loss")
# Training flags `--mode=tune` can search, each by `--search_NAME=MIN:MAX`:
# NAME -> (type, KerasTuner sampling, bounds check, bounds in words).
SEARCHABLE = {
    "unfreeze_blocks": (int, "linear",
                        lambda v: 0 <= v <= len(RESNET50_BLOCKS),
                        f"0 to {len(RESNET50_BLOCKS)} (ResNet50's blocks)"),
    "finetune_learning_rate": (float, "log", lambda v: v > 0, "above 0"),
    "head_learning_rate": (float, "log", lambda v: v > 0, "above 0"),
    "dropout": (float, "linear", lambda v: 0 <= v < 1, "in [0, 1)"),
}
# What `--mode=tune` searches when no --search_* flag is given: how deep to
# fine-tune and how fast, the two choices that decide whether fine-tuning
# helps or hurts on a given dataset (README, "The recipe").
DEFAULT_SEARCH = {"unfreeze_blocks": "0:16",
                  "finetune_learning_rate": "1e-5:1e-3"}
# Speed switches. "auto" is resolved per machine in speed.py.
JIT_COMPILE_CHOICES = ("auto", "true", "false")
MIXED_PRECISION_CHOICES = ("auto", "float32", "mixed_float16",
                           "mixed_bfloat16")
LR_SCHEDULES = ("cosine", "constant")
CLASS_WEIGHTINGS = ("auto", "none")


class UserError(Exception):
  """A problem with the user's input: reported as one paragraph, no trace."""


class Preempted(Exception):
  """A stop signal (SIGTERM, or SIGINT: checkpoints.StoppedBySignal) ended
  training after a checkpoint; rerunning resumes it."""

# Config fields that describe an action of one invocation, not the run:
# flags.cfg leaves them out, so reusing it as --flagfile never wipes
# checkpoints (--fresh).
NOT_RECORDED = ("fresh",)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything one run needs. Field names equal the flag names."""
  workdir: str
  mode: str = "train"
  dataset: str = "demo"
  data_dir: str = ""
  image_size: int = 224
  batch_size: int = 32
  val_fraction: float = 0.15
  test_fraction: float = 0.0
  weights: str = "imagenet"
  backbone: str = "resnet50"
  head_epochs: int = 50
  head_learning_rate: float = 1e-3
  finetune_epochs: int = 10
  finetune_learning_rate: float = 1e-4
  unfreeze_blocks: int = 16
  dropout: float = 0.2
  label_smoothing: float = 0.1
  augment: Tuple[str, ...] = ("flip",)
  strategy: str = "auto"
  virtual_cpu_devices: int = 0
  jit_compile: str = "auto"
  seed: int = 42
  export_dir: str = ""
  top_k: int = 5
  inputs: str = ""
  save_every_steps: int = 0
  fresh: bool = False
  # Mode "tune" (tuning.py). An empty search_* flag keeps that training flag
  # fixed; "MIN:MAX" searches it.
  search_unfreeze_blocks: str = ""
  search_finetune_learning_rate: str = ""
  search_head_learning_rate: str = ""
  search_dropout: str = ""
  tuner: str = "random"
  max_trials: int = 10
  max_epochs: int = 0  # Hyperband's largest budget; 0: all epochs of a run.
  hyperband_factor: int = 3
  objective: str = "val_accuracy"
  early_stopping_patience: int = 0  # 0: off.
  executions_per_trial: int = 1
  overwrite_search: bool = False
  mixed_precision: str = "auto"
  cache_features: bool = True
  feature_views: int = 1  # 1: the un-augmented images.
  cache_memory_mb: int = 1024
  lr_schedule: str = "cosine"
  warmup_fraction: float = 0.1
  class_weighting: str = "auto"

  @property
  def total_epochs(self) -> int:
    return self.head_epochs + self.finetune_epochs

  @property
  def resolved_export_dir(self) -> str:
    import os  # Local: keeps the module import-light for main's flag parsing.
    return self.export_dir or os.path.join(self.workdir, "export")

  def validate(self) -> "Config":
    """Checks every field; raises UserError naming the flag. Returns self."""
    _check(bool(self.workdir), "--workdir is required.")
    _check(self.mode in MODES, f"--mode={self.mode!r}: expected one of {MODES}.")
    _check(self.dataset == "demo" or self.dataset.startswith(DATASET_SCHEMES[1:])
           and len(self.dataset.split(":", 1)[1]) > 0,
           f"--dataset={self.dataset!r}: expected 'demo', 'folder:DIR' or "
           "'tfds:NAME[:VERSION]'.")
    _check(self.image_size >= 32,
           f"--image_size={self.image_size}: ResNet50 needs at least 32 pixels.")
    _check(self.batch_size >= 1, f"--batch_size={self.batch_size}: must be >= 1.")
    for name in ("val_fraction", "test_fraction"):
      value = getattr(self, name)
      _check(0.0 <= value < 1.0, f"--{name}={value}: must be in [0, 1).")
    _check(self.val_fraction + self.test_fraction < 1.0,
           "--val_fraction plus --test_fraction must be below 1: nothing would "
           "be left to train on.")
    _check(self.backbone in BACKBONES,
           f"--backbone={self.backbone!r}: expected one of {BACKBONES}.")
    _check(self.weights != "", "--weights: expected 'imagenet', 'none' or a "
           "path to a .weights.h5 file.")
    for name in ("head_epochs", "finetune_epochs"):
      _check(getattr(self, name) >= 0, f"--{name}: must be >= 0.")
    _check(self.total_epochs >= 1,
           "--head_epochs plus --finetune_epochs must be at least 1.")
    for name in ("head_learning_rate", "finetune_learning_rate"):
      _check(getattr(self, name) > 0, f"--{name}={getattr(self, name)}: must "
             "be > 0.")
    _check(0 <= self.unfreeze_blocks <= len(RESNET50_BLOCKS),
           f"--unfreeze_blocks={self.unfreeze_blocks}: ResNet50 has "
           f"{len(RESNET50_BLOCKS)} residual blocks; expected 0 to "
           f"{len(RESNET50_BLOCKS)}.")
    _check(0.0 <= self.dropout < 1.0, f"--dropout={self.dropout}: must be in [0, 1).")
    _check(self.lr_schedule in LR_SCHEDULES,
           f"--lr_schedule={self.lr_schedule!r}: expected one of "
           f"{LR_SCHEDULES}.")
    _check(0.0 <= self.warmup_fraction < 1.0,
           f"--warmup_fraction={self.warmup_fraction}: must be in [0, 1).")
    _check(self.class_weighting in CLASS_WEIGHTINGS,
           f"--class_weighting={self.class_weighting!r}: expected one of "
           f"{CLASS_WEIGHTINGS}.")
    _check(0.0 <= self.label_smoothing < 1.0,
           f"--label_smoothing={self.label_smoothing}: must be in [0, 1).")
    _check(self.strategy in STRATEGIES,
           f"--strategy={self.strategy!r}: expected one of {STRATEGIES}.")
    _check(self.virtual_cpu_devices >= 0, "--virtual_cpu_devices: must be >= 0.")
    _check(self.top_k >= 1, f"--top_k={self.top_k}: must be >= 1.")
    self._check_inputs()
    self._validate_fault_tolerance()
    self._validate_search()
    self._check_speed_switches()
    return self

  def _check_inputs(self) -> None:
    """--inputs is what --mode=predict classifies; checked before TF loads."""
    if self.mode != "predict":
      return
    import os  # Local, as in resolved_export_dir.
    _check(bool(self.inputs), "--mode=predict needs --inputs=FILE_OR_DIR: an "
           "image file or a folder of images to classify.")
    _check(os.path.exists(self.inputs), f"--inputs={self.inputs!r}: no such "
           "file or folder.")

  def _validate_fault_tolerance(self) -> None:
    """Checks the checkpointing flags and the --weights file type."""
    _check(self.weights in ("imagenet", "none")
           or self.weights.endswith(".weights.h5"),
           f"--weights={self.weights!r}: expected 'imagenet', 'none' or a "
           "path ending in .weights.h5; only weight files are accepted, "
           "never a whole model (.keras, .h5, SavedModel) that could carry "
           "code.")
    _check(self.save_every_steps >= 0,
           f"--save_every_steps={self.save_every_steps}: must be >= 0 "
           "(0: a checkpoint at the end of every epoch only).")
    _check(not self.fresh or self.mode == "train",
           f"--fresh: only applies to --mode=train, not --mode={self.mode}.")
  def search_ranges(self) -> Dict[str, Tuple]:
    """{training flag: (MIN, MAX)} for every search_* flag that is set;
    DEFAULT_SEARCH when none is."""
    texts = {name: getattr(self, "search_" + name) for name in SEARCHABLE
             if getattr(self, "search_" + name)} or DEFAULT_SEARCH
    return {name: parse_search_range(name, text)
            for name, text in texts.items()}

  def _validate_search(self) -> None:
    self.search_ranges()  # Raises on a malformed range.
    _check(self.tuner in TUNERS,
           f"--tuner={self.tuner!r}: expected one of {TUNERS}.")
    _check(self.objective in OBJECTIVES,
           f"--objective={self.objective!r}: expected one of {OBJECTIVES}.")
    for name in ("max_trials", "executions_per_trial"):
      _check(getattr(self, name) >= 1,
             f"--{name}={getattr(self, name)}: must be >= 1.")
    _check(self.hyperband_factor >= 2,
           f"--hyperband_factor={self.hyperband_factor}: must be >= 2.")
    _check(0 <= self.max_epochs <= self.total_epochs,
           f"--max_epochs={self.max_epochs}: must be 0 (all epochs of a run) "
           "to --head_epochs plus --finetune_epochs = "
           f"{self.total_epochs}; a trial never trains longer than the run "
           "it stands for.")
    _check(self.early_stopping_patience >= 0,
           "--early_stopping_patience: must be >= 0 (0: off).")

  def _check_speed_switches(self) -> None:
    """XLA, precision and stage-1 feature caching."""
    for name, choices in (("jit_compile", JIT_COMPILE_CHOICES),
                          ("mixed_precision", MIXED_PRECISION_CHOICES)):
      value = getattr(self, name)
      _check(value in choices, f"--{name}={value!r}: expected one of {choices}.")
    _check(self.feature_views >= 1,
           f"--feature_views={self.feature_views}: must be >= 1 (1: the "
           "un-augmented images).")
    _check(self.cache_memory_mb >= 0,
           f"--cache_memory_mb={self.cache_memory_mb}: must be >= 0.")
    if not self.caches_features or self.feature_views == 1:
      return
    _check(bool(self.augment),
           f"--feature_views={self.feature_views} with --augment=none: "
           "without augmentation every view is the same image; use "
           "--feature_views=1.")
    _check(self.feature_views <= self.head_epochs,
           f"--feature_views={self.feature_views} exceeds --head_epochs="
           f"{self.head_epochs}: head epoch e trains on view e mod K, so "
           "views beyond the number of head epochs would be computed and "
           "never used.")

  @property
  def caches_features(self) -> bool:
    """Whether stage head trains on cached backbone features."""
    return self.cache_features and self.head_epochs > 0


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise UserError(message)


def parse_search_range(name: str, text: str) -> Tuple:
  """'1e-5:1e-3' for `name` -> (1e-05, 0.001), checked; raises UserError."""
  cast, _, in_bounds, bounds = SEARCHABLE[name]
  flag = f"--search_{name}={text!r}"
  kind = "whole numbers" if cast is int else "numbers"
  try:
    low, high = (cast(part) for part in text.split(":"))
  except ValueError:
    raise UserError(f"{flag}: expected MIN:MAX, two {kind} separated by "
                    "a colon.") from None
  _check(math.isfinite(low) and math.isfinite(high) and in_bounds(low)
         and in_bounds(high), f"{flag}: both bounds must be {bounds}.")
  _check(low <= high, f"{flag}: MIN {low} is above MAX {high}; expected "
         "MIN:MAX with MIN <= MAX.")
  return low, high


def parse_augment(value: str) -> Tuple[str, ...]:
  """'flip, zoom' -> ('flip', 'zoom'); 'none' or '' -> ()."""
  names = tuple(n.strip() for n in value.split(",") if n.strip())
  return () if names in ((), ("none",)) else names


def to_flagfile(config: Config) -> str:
  """The config as absl flag lines, reusable as `--flagfile`."""
  lines = []
  for field in dataclasses.fields(config):
    if field.name in NOT_RECORDED:
      continue
    value = getattr(config, field.name)
    if isinstance(value, bool):
      value = "true" if value else "false"
    elif isinstance(value, tuple):
      value = ",".join(value) or "none"
    lines.append(f"--{field.name}={value}")
  return "\n".join(lines) + "\n"

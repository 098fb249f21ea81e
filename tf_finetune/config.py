"""The run configuration: one frozen dataclass, validated once, at start.

`main.py` turns absl flags into a `Config`; every other module takes a
`Config` (or plain arguments), so each stage of the data flow is callable
from tests and notebooks without flags. All range and consistency checks
live in `Config.validate`, so a bad value fails before any expensive work.
"""

import dataclasses
from typing import Optional, Tuple

# Residual blocks of ResNet50, bottom to top; `unfreeze_blocks` counts from
# the end of this list.
RESNET50_BLOCKS = tuple(
    f"conv{stage}_block{i}"
    for stage, count in ((2, 3), (3, 4), (4, 6), (5, 3))
    for i in range(1, count + 1))

# "tune" joins with issue 4.
MODES = ("train", "evaluate", "export", "predict")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
BACKBONES = ("resnet50",)
DATASET_SCHEMES = ("demo", "folder:", "tfds:")


class UserError(Exception):
  """A problem with the user's input: reported as one paragraph, no trace."""


class Preempted(Exception):
  """SIGTERM stopped training after a checkpoint; rerunning resumes it."""

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
  head_epochs: int = 5
  head_learning_rate: float = 1e-3
  finetune_epochs: int = 5
  finetune_learning_rate: float = 1e-5
  unfreeze_blocks: int = 3
  dropout: float = 0.2
  label_smoothing: float = 0.0
  augment: Tuple[str, ...] = ("flip", "rotation", "zoom")
  strategy: str = "auto"
  virtual_cpu_devices: int = 0
  jit_compile: bool = False
  seed: int = 42
  export_dir: str = ""
  top_k: int = 5
  inputs: str = ""
  save_every_steps: int = 0
  fresh: bool = False

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
    _check(0.0 <= self.label_smoothing < 1.0,
           f"--label_smoothing={self.label_smoothing}: must be in [0, 1).")
    _check(self.strategy in STRATEGIES,
           f"--strategy={self.strategy!r}: expected one of {STRATEGIES}.")
    _check(self.virtual_cpu_devices >= 0, "--virtual_cpu_devices: must be >= 0.")
    _check(self.top_k >= 1, f"--top_k={self.top_k}: must be >= 1.")
    self._check_inputs()
    self._validate_fault_tolerance()
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


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise UserError(message)


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

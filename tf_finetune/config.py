"""The run configuration: one frozen dataclass, validated once, at start.

`main.py` turns absl flags into a `Config`; every other module takes a
`Config` (or plain arguments), so each stage of the data flow is callable
from tests and notebooks without flags. All range and consistency checks
live in `Config.validate`, so a bad value fails before any expensive work.
"""

import dataclasses
import json
import math
import signal
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

# Residual blocks of ResNet50, bottom to top; `unfreeze_blocks` counts from
# the end of this list.
RESNET50_BLOCKS = tuple(
    f"conv{stage}_block{i}"
    for stage, count in ((2, 3), (3, 4), (4, 6), (5, 3))
    for i in range(1, count + 1))

MODES = ("train", "evaluate", "export", "predict", "tune")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
BACKBONES = ("resnet50",)
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
    "finetune_epochs": (int, "log", lambda v: v >= 1, "at least 1"),
}
# Searched flags that change what stage head trains: searching one gives
# every trial a stage head of its own (tuning.shares_stage_head).
HEAD_HYPERPARAMETERS = ("head_learning_rate", "dropout")
# The settings stage finetune alone reads: runs that differ only in these
# (and in resumable ones) train the same stage head (--shared_head).
FINETUNE_SETTINGS = ("finetune_epochs", "finetune_min_steps",
                     "finetune_learning_rate", "unfreeze_blocks",
                     "warmup_fraction", "early_stopping_patience")
# What `--mode=tune` searches when no --search_* flag is given: what the
# recipe leaves to the data (README, "The recipe"): how deep, how fast and
# how long to fine-tune, each range holding the default inside (16 blocks,
# 1e-4 and 10 epochs at the log-scale middle); 16 is all of ResNet50's
# blocks, so depth can only go down from the default.
DEFAULT_SEARCH = {"unfreeze_blocks": "4:16",
                  "finetune_learning_rate": "2e-5:5e-4",
                  "finetune_epochs": "5:20"}
# Speed switches. "auto" is resolved per machine in speed.py.
JIT_COMPILE_CHOICES = ("auto", "true", "false")
MIXED_PRECISION_CHOICES = ("auto", "float32", "mixed_float16",
                           "mixed_bfloat16")
LR_SCHEDULES = ("cosine", "constant")
# --class_weighting: inverse-frequency weights at a 2x imbalance, or none
# (weighting.py).
CLASS_WEIGHTINGS = ("auto", "none")
# Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS), about
# 9,500 x 9,500: far above any photo a classifier needs, and a sixth of the
# 536 megapixels TensorFlow's PNG decoder allows (README, "Images too large
# to decode").
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# What an export writes: the SavedModel, and LiteRT models inside it
# (litert.py).
EXPORT_FORMATS = ("saved_model", "tflite")
# What --mode=predict and evaluate run: model.keras / the SavedModel, or the
# latest export's LiteRT model (float32, int8).
RUNTIMES = ("tensorflow", "tflite", "tflite_int8")


# Exit codes of `python -m tf_finetune.main`. 128 + the signal's number is
# the shell's code for a process that signal ended: job schedulers then see
# an unfinished run and restart it, and the restart resumes. SIGTERM: 143;
# SIGINT (Ctrl-C): 130. Bad input exits 2; a diverged run 3, so that a
# search tells a trial that diverged (one bad trial) from bad input (which
# fails every trial).
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
USER_ERROR_EXIT_CODE = 2
DIVERGED_EXIT_CODE = 3


class UserError(Exception):
  """A problem with the user's input: reported as one paragraph, no trace."""


class TrainingDiverged(UserError):
  """The loss or the weights became NaN or infinite (checkpoints.py); its
  own exit code, so a search tells it from bad input (main.py)."""


class Preempted(Exception):
  """A stop signal (SIGTERM, or SIGINT: stop_signals.StoppedBySignal) ended
  training after a checkpoint; rerunning resumes it."""


def setting(default=dataclasses.MISSING, help: str = "", *,
            choices: Optional[Tuple[str, ...]] = None, resumable: bool = False,
            recorded: bool = True, case_sensitive: bool = True,
            absent=dataclasses.MISSING):
  """A `Config` field that also says what its flag and a resume need.

  main.py defines each flag from its field (type, default, help, choices),
  `to_flagfile` writes the recorded ones, and `fingerprint` leaves out the
  resumable ones: a new setting is this one line plus its use.

  Args:
    default: the field's default; none for a required setting.
    help: the flag's help text, one or two sentences.
    choices: the values the flag accepts (an enum flag); `validate` refuses
      others.
    resumable: whether a resumed run or search may change it: where things
      go and how fast they run, not what is computed. Every other setting is
      part of the fingerprint, so a setting added later is protected by
      default.
    recorded: whether flags.cfg keeps it. False for an action of one
      invocation, not of the run: reusing flags.cfg as --flagfile must not
      repeat it.
    case_sensitive: False lets the enum flag take any case of a choice.
    absent: the value that does what versions without this setting did,
      when the default does something new; default: the default.
  """
  return dataclasses.field(default=default, metadata={
      "help": help, "choices": choices, "resumable": resumable,
      "recorded": recorded, "case_sensitive": case_sensitive,
      "absent": default if absent is dataclasses.MISSING else absent})


def _search_help(name: str) -> str:
  return f"MIN:MAX range of --{name} to search (mode tune)."


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything one run needs. Field names equal the flag names."""
  workdir: str = setting(help="Output folder (required).", resumable=True)
  mode: str = setting("train", "Job to run.", choices=MODES, resumable=True)
  dataset: str = setting("demo", "demo | folder:DIR | tfds:NAME[:VERSION].")
  data_dir: str = setting(
      "", "TFDS data folder; also where the demo dataset is written.",
      resumable=True)
  image_size: int = setting(224, "Square input side, >= 32.")
  batch_size: int = setting(32, "Global batch size.")
  val_fraction: float = setting(
      0.15, "Validation share when the source has no such split.")
  test_fraction: float = setting(
      0.0, "Test share when the source has no such split.")
  weights: str = setting("imagenet", "imagenet | none | PATH to a "
                         "ResNet50(include_top=False) .weights.h5 file.")
  backbone: str = setting("resnet50", "Backbone.", choices=BACKBONES)
  head_epochs: int = setting(50, "Epochs of stage head.")
  head_learning_rate: float = setting(1e-3, "Learning rate of stage head.")
  finetune_epochs: int = setting(
      10, "Epochs of stage finetune, raised on small data to reach "
      "--finetune_min_steps.")
  finetune_min_steps: int = setting(
      320, "Fewest training steps of stage finetune: --finetune_epochs grows "
      "to ceil(N / steps per epoch) when that is more (0: exactly "
      "--finetune_epochs).", absent=0)
  finetune_learning_rate: float = setting(
      1e-4, "Learning rate of stage finetune.")
  unfreeze_blocks: int = setting(
      16, "Residual blocks unfrozen in stage finetune, from the top (0-16).")
  dropout: float = setting(0.2, "Dropout before the head.")
  label_smoothing: float = setting(0.1, "Label smoothing.")
  class_weighting: str = setting(
      "auto", "auto: weigh training examples by inverse class frequency, and "
      "select on balanced validation accuracy, when the largest class has "
      "at least 2x the smallest's images; none: unweighted.",
      choices=CLASS_WEIGHTINGS)
  augment: Tuple[str, ...] = setting(
      ("flip",), "Comma list of augmentations, or none.")
  strategy: str = setting("auto", "tf.distribute strategy.",
                          choices=STRATEGIES, resumable=True)
  virtual_cpu_devices: int = setting(
      0, "Split the CPU into N logical devices (0: don't).", resumable=True)
  jit_compile: str = setting(
      "auto", "XLA-compile the train step. auto: on with GPUs, off on CPUs "
      "(compiling costs more than it saves there).",
      choices=JIT_COMPILE_CHOICES, resumable=True, case_sensitive=False)
  seed: int = setting(42, "Seed for splits, shuffling, augmentation and "
                      "initialisation.")
  export_dir: str = setting(
      "", "SavedModel versions go here; default WORKDIR/export.",
      resumable=True)
  top_k: int = setting(5, "Classes returned by the export.", resumable=True)
  export_formats: Tuple[str, ...] = setting(
      ("saved_model",), "Comma list: saved_model, and tflite for LiteRT "
      "models (float32 and int8) in EXPORT/<N>/tflite/.", resumable=True)
  runtime: str = setting(
      "tensorflow", "--mode=predict and evaluate: tensorflow, or the latest "
      "export's LiteRT model (tflite: float32, tflite_int8).",
      choices=RUNTIMES, resumable=True)
  max_image_pixels: int = setting(
      DEFAULT_MAX_IMAGE_PIXELS, "Images whose header says more pixels are "
      "refused before decoding, in training and by the export (default: "
      "Pillow's limit; 0: no limit).")
  inputs: str = setting(
      "", "--mode=predict: an image file or a folder of images.")
  save_every_steps: int = setting(
      0, "Also checkpoint every N training steps (0: at the end of each "
      "epoch only).", resumable=True)
  save_interval_seconds: int = setting(
      60, "An epoch's end writes a checkpoint only when this many seconds "
      "passed since the last one (0: at every epoch's end). The end of each "
      "stage and of the run, a stop signal and --save_every_steps always "
      "checkpoint.", resumable=True)
  fresh: bool = setting(
      False, "Delete WORKDIR/checkpoints and train from the start instead of "
      "resuming.", resumable=True, recorded=False)
  export: bool = setting(
      True, "Write a SavedModel version at the end of training (--noexport: "
      "search trials; --mode=export writes one later from model.keras).",
      resumable=True)
  shared_head: str = setting(
      "", "DIR shared by runs that train the same stage head: start stage "
      "finetune from the stage-head checkpoint in DIR/checkpoints, or train "
      "stage head and write that checkpoint there (search trials).",
      resumable=True)
  model_seed: int = setting(
      -1, "Seed of initialisation and dropout (-1: --seed); a search's "
      "repeated executions of a trial use --seed + i.")
  # Mode "tune" (tuning.py). An empty search_* flag keeps that training flag
  # fixed; "MIN:MAX" searches it. One per SEARCHABLE name.
  search_unfreeze_blocks: str = setting("", _search_help("unfreeze_blocks"))
  search_finetune_learning_rate: str = setting(
      "", _search_help("finetune_learning_rate"))
  search_head_learning_rate: str = setting(
      "", _search_help("head_learning_rate"))
  search_dropout: str = setting("", _search_help("dropout"))
  search_finetune_epochs: str = setting(
      "", _search_help("finetune_epochs"))
  tuner: str = setting("bayesian", "Search algorithm.", choices=TUNERS)
  max_trials: int = setting(5, "Trials of the search.", resumable=True)
  max_epochs: int = setting(0, "Hyperband's largest epoch budget per trial "
                            "(0: --head_epochs plus --finetune_epochs).")
  hyperband_factor: int = setting(
      3, "Hyperband's reduction factor between rounds.")
  objective: str = setting(
      "val_accuracy", "Validation metric the run keeps its best epoch by "
      "(over both stages), and that the search optimises.",
      choices=OBJECTIVES)
  early_stopping_patience: int = setting(
      0, "Stop stage finetune after this many epochs without a better "
      "objective (0: off).")
  executions_per_trial: int = setting(
      1, "Trainings per trial, from different initialisations; the score is "
      "their mean.")
  overwrite_search: bool = setting(
      False, "Start the search in WORKDIR/tuner/ afresh instead of resuming "
      "it.", resumable=True)
  mixed_precision: str = setting(
      "auto", "Keras dtype policy. auto: mixed_float16 on GPUs of compute "
      "capability >= 7, else float32.", choices=MIXED_PRECISION_CHOICES)
  cache_features: bool = setting(
      True, "Stage head trains on backbone features computed once per view "
      "of each image instead of running the frozen backbone in every epoch.")
  calibrate: bool = setting(
      True, "Fit a temperature on the validation split after training and "
      "fold it into the model when it is significantly better than none, so "
      "served probabilities are calibrated.", resumable=True)
  probe_head: bool = setting(
      True, "With --cache_features, stage head is a linear probe: "
      "standardised features, L2 strength picked on the validation split, "
      "no dropout.")
  feature_views: int = setting(
      1, "Views per training image in the feature cache: 1 is the "
      "un-augmented images (--augment then applies in stage finetune only); "
      "K >= 2 are K augmented views, head epoch e trains on view e mod K.")
  cache_memory_mb: int = setting(
      1024, "Feature cache held in memory up to this size; the rest goes to "
      "files under WORKDIR/feature_cache/.", resumable=True)
  lr_schedule: str = setting(
      "cosine", "Learning rate within each stage: cosine decays it to zero "
      "over the stage; constant keeps it.", choices=LR_SCHEDULES)
  warmup_fraction: float = setting(
      0.1, "Share of stage finetune's steps over which its learning rate "
      "rises linearly from zero (cosine schedule).")

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
    for field in dataclasses.fields(self):
      choices, value = field.metadata["choices"], getattr(self, field.name)
      _check(choices is None or value in choices,
             f"--{field.name}={value!r}: expected one of {choices}.")
    parse_dataset(self.dataset)
    _check(self.image_size >= 32,
           f"--image_size={self.image_size}: ResNet50 needs at least 32 pixels.")
    self._check_export_formats()
    _check(self.max_image_pixels >= 0,
           f"--max_image_pixels={self.max_image_pixels}: must be >= 0 (0: "
           "no limit).")
    _check(self.batch_size >= 1, f"--batch_size={self.batch_size}: must be >= 1.")
    for name in ("val_fraction", "test_fraction"):
      value = getattr(self, name)
      _check(0.0 <= value < 1.0, f"--{name}={value}: must be in [0, 1).")
    _check(self.val_fraction + self.test_fraction < 1.0,
           "--val_fraction plus --test_fraction must be below 1: nothing would "
           "be left to train on.")
    _check(self.weights != "", "--weights: expected 'imagenet', 'none' or a "
           "path to a .weights.h5 file.")
    for name in ("head_epochs", "finetune_epochs", "finetune_min_steps"):
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
    _check(0.0 <= self.warmup_fraction < 1.0,
           f"--warmup_fraction={self.warmup_fraction}: must be in [0, 1).")
    _check(0.0 <= self.label_smoothing < 1.0,
           f"--label_smoothing={self.label_smoothing}: must be in [0, 1).")
    _check(self.virtual_cpu_devices >= 0, "--virtual_cpu_devices: must be >= 0.")
    _check(self.top_k >= 1, f"--top_k={self.top_k}: must be >= 1.")
    self._check_inputs()
    self._validate_fault_tolerance()
    self._validate_search()
    self._check_feature_cache()
    return self

  def _check_export_formats(self) -> None:
    text = ",".join(self.export_formats)
    unknown = [name for name in self.export_formats
               if name not in EXPORT_FORMATS]
    if unknown:
      raise UserError(f"--export_formats={text!r}: unknown format "
                      f"{unknown[0]!r}; expected a comma list of "
                      f"{EXPORT_FORMATS}.")
    # The LiteRT models live inside a SavedModel version (litert.py), the
    # folder TF Serving and the comparisons of --mode=evaluate read.
    _check("saved_model" in self.export_formats,
           f"--export_formats={text!r}: must include saved_model; the "
           "tflite models are written inside its version folder "
           "(EXPORT/<N>/tflite/). Use --export_formats=saved_model,tflite.")

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
    _check(self.save_interval_seconds >= 0,
           f"--save_interval_seconds={self.save_interval_seconds}: must be "
           ">= 0 (0: a checkpoint at the end of every epoch).")
    _check(not self.fresh or self.mode == "train",
           f"--fresh: only applies to --mode=train, not --mode={self.mode}.")
    _check(not self.shared_head or self.head_epochs > 0,
           "--shared_head: needs a stage head (--head_epochs > 0).")

  def search_ranges(self) -> Dict[str, Tuple]:
    """{training flag: (MIN, MAX)} for every search_* flag that is set;
    DEFAULT_SEARCH when none is."""
    texts = {name: getattr(self, "search_" + name) for name in SEARCHABLE
             if getattr(self, "search_" + name)} or DEFAULT_SEARCH
    return {name: parse_search_range(name, text)
            for name, text in texts.items()}

  def _validate_search(self) -> None:
    self.search_ranges()  # Raises on a malformed range.
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

  def _check_feature_cache(self) -> None:
    """Stage-1 feature caching."""
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


def parse_export_formats(value: str) -> Tuple[str, ...]:
  """'saved_model, tflite' -> ('saved_model', 'tflite'), without repeats."""
  names = (n.strip() for n in value.split(",") if n.strip())
  return tuple(dict.fromkeys(names))


def parse_augment(value: str) -> Tuple[str, ...]:
  """'flip, Zoom' -> ('flip', 'zoom'); 'none' or '' -> ()."""
  names = tuple(n.strip().lower() for n in value.split(",") if n.strip())
  return () if names in ((), ("none",)) else names


def parse_dataset(dataset: str) -> Tuple[str, str]:
  """`--dataset` -> (scheme, source): 'demo' -> ('demo', ''), 'folder:DIR'
  -> ('folder', 'DIR'), 'tfds:NAME[:VERSION]' -> ('tfds', 'NAME[:VERSION]').

  Raises:
    UserError: any other value.
  """
  scheme, _, source = dataset.partition(":")
  if dataset == "demo" or (scheme in ("folder", "tfds") and source):
    return scheme, source
  raise UserError(f"--dataset={dataset!r}: expected 'demo', 'folder:DIR' or "
                  "'tfds:NAME[:VERSION]'.")


def first_line(error: Exception) -> str:
  """The first line of `error`'s message, at most 300 characters ("" for
  none): Keras' and TFDS' messages can list every layer or file after it,
  and a UserError quoting one stays one paragraph."""
  return (str(error).strip().splitlines() or [""])[0][:300]


def to_flagfile(config: Config) -> str:
  """The config as absl flag lines, reusable as `--flagfile`: every recorded
  setting (`setting`)."""
  lines = []
  for field in dataclasses.fields(config):
    if not field.metadata["recorded"]:
      continue
    value = getattr(config, field.name)
    if isinstance(value, bool):
      value = "true" if value else "false"
    elif isinstance(value, tuple):
      value = ",".join(value) or "none"
    lines.append(f"--{field.name}={value}")
  return "\n".join(lines) + "\n"


def resumable_settings() -> FrozenSet[str]:
  """The settings a resumed training run or search may change."""
  return frozenset(field.name for field in dataclasses.fields(Config)
                   if field.metadata["resumable"])


def fingerprint(config: Config) -> Dict:
  """What a run or a search computes, as JSON values: every setting but
  the resumable ones. Checkpoints and a search's search.json keep it."""
  resumable = resumable_settings()
  return _as_json({field.name: getattr(config, field.name)
                   for field in dataclasses.fields(config)
                   if field.name not in resumable})


def _as_json(values: Mapping[str, Any]) -> Dict:
  return json.loads(json.dumps(values))


def changed_flags(stored: Mapping[str, Any],
                  current: Mapping[str, Any]) -> List[str]:
  """'--NAME was A, now B' for each setting whose value differs between a
  stored fingerprint and the current one.

  A setting the stored fingerprint lacks was added by a later version of
  tf_finetune: the stored work ran as the setting's `absent` value does
  (its default, unless the default changed the behaviour), so it differs
  only when set to another value. A setting only `stored` has was removed: nothing here
  could honour it, so it is no change.
  """
  defaults = _as_json({field.name: field.metadata["absent"]
                       for field in dataclasses.fields(Config)
                       if field.default is not dataclasses.MISSING})
  changes = []
  for name in sorted(current):
    before = stored.get(name, defaults.get(name, current[name]))
    if before != current[name]:
      changes.append(f"--{name} was {before!r}, now {current[name]!r}")
  return changes


def refuse_changed_flags(stored: Mapping[str, Any], current: Mapping[str, Any],
                         holder: str, remedy: str) -> None:
  """Refuses to continue work begun with other run-defining settings.

  Args:
    stored: the fingerprint the work was begun with.
    current: the fingerprint of this invocation (`fingerprint`).
    holder: what holds the work, e.g. "--workdir='w' holds the checkpoints
      of a different run".
    remedy: the sentences that say how to go on.

  Raises:
    UserError: "{holder} (--a was 1, now 2; ...). {remedy}" when
      `changed_flags` finds a difference.
  """
  changed = changed_flags(stored, current)
  if changed:
    raise UserError(f"{holder} ({'; '.join(changed)}). {remedy}")

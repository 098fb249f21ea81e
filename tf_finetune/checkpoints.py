"""Checkpoints: a run that dies resumes where it stopped, in the right stage.

Layout of WORKDIR/checkpoints/ (removed once a run has written its report):

  checkpoint.json           the pointer: which weights file is current, the
                            position it was saved at (epoch, step), the stage
                            its optimizer belongs to, the stage records so
                            far and the run's fingerprint. Replaced
                            atomically, and only after the file it names is
                            complete on disk.
  ckpt-EEEE-SSSSSS.weights.h5
                            Keras weights file: every model variable
                            (BatchNorm statistics and the dropout seed state
                            included) and the stage's optimizer variables
                            (Adam moments, iteration count, learning rate).

Why not `keras.callbacks.BackupAndRestore` (Keras 3.15.1): it overwrites its
weights file in place and writes the epoch next to it afterwards, so a crash
mid-save leaves a torn file or a mismatched pair; it restores the epoch but
not the step (`training_metadata.json` records the batch, `_load_model`
ignores it), so a step checkpoint replays the epoch's first steps; it loads
optimizer variables into whatever optimizer the model has, and Keras only
warns and skips them when their number differs (the head stage's Adam vs
the finetune stage's); and it deletes its backup in `on_train_end`, which
also runs when `TerminateOnNaN` stops a diverged run (keras-team/keras#21771).
Here the stage is applied before the weights are loaded (`restore`), and
`fit_segments` finishes an interrupted epoch with its remaining steps only.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np
from absl import logging

from tf_finetune import stages
from tf_finetune.config import Config, Preempted, UserError

CHECKPOINT_DIR = "checkpoints"
POINTER_FILE = "checkpoint.json"
_FORMAT = 1
_TEMP_PREFIX = ".tmp-"
# Flags that may change between a run and its resumption: where things go
# and how fast they run, not what is trained. Every other Config field is
# part of the fingerprint, so a flag added later is protected by default.
RESUMABLE_CHANGES = ("workdir", "mode", "data_dir", "strategy",
                     "virtual_cpu_devices", "jit_compile", "export_dir",
                     "top_k", "save_every_steps", "fresh",
                     "cache_memory_mb")


class TrainingDiverged(UserError):
  """The loss or the weights became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainingState:
  """Where a checkpoint was taken.

  Attributes:
    epoch: 0-based index of the epoch to continue (= epochs completed).
    step: batches of `epoch` already trained (0 at an epoch boundary).
    stage: the stage the model and its optimizer were in when saved.
    records: the stage callback's records so far (`records_state`).
    file: the weights file's name inside the checkpoint folder.
    num_optimizer_variables: how many variables the saved optimizer has.
    fingerprint: the run-defining flags (`fingerprint`).
    best: the best epoch so far (`selection.BestWeights.state`), or None.
    best_file: the file of its weights inside the checkpoint folder.
  """
  epoch: int
  step: int
  stage: str
  records: List[Dict]
  file: str
  num_optimizer_variables: int
  fingerprint: Dict
  best: Optional[Dict] = None
  best_file: Optional[str] = None


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_DIR)


def fingerprint(config: Config) -> Dict:
  """The flags that define what a run trains, as JSON values."""
  values = dataclasses.asdict(config)
  return json.loads(json.dumps(
      {k: v for k, v in values.items() if k not in RESUMABLE_CHANGES}))


def read_state(workdir: str) -> Optional[TrainingState]:
  """The state of WORKDIR's last checkpoint, or None when there is none."""
  path = os.path.join(checkpoint_dir(workdir), POINTER_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      payload = json.load(f)
    if payload.get("format") != _FORMAT:
      raise ValueError(f"unknown format {payload.get('format')!r}")
    payload.pop("format")
    return TrainingState(**payload)
  except (ValueError, TypeError) as e:
    raise UserError(f"--workdir={workdir!r}: {path} is not a checkpoint "
                    f"pointer this version can read ({e}). Pass --fresh to "
                    "delete the checkpoints and start over.") from e


def check_workdir(config: Config) -> Optional[TrainingState]:
  """Returns the state to resume from, or None for a fresh start.

  Raises:
    UserError: WORKDIR holds checkpoints of a run with other run-defining
      flags, and --fresh was not given.
  """
  if config.fresh:
    return None
  state = read_state(config.workdir)
  if state is None:
    return None
  current = fingerprint(config)
  changed = [f"--{k} was {state.fingerprint[k]!r}, now {current[k]!r}"
             for k in sorted(current) if k in state.fingerprint
             and state.fingerprint[k] != current[k]]
  if changed:
    raise UserError(
        f"--workdir={config.workdir!r} holds the checkpoints of a different "
        f"run ({'; '.join(changed)}). Rerun with that run's flags (its "
        "flags.cfg) to resume it, choose another --workdir, or pass --fresh "
        "to delete its checkpoints and start over.")
  return state


def prepare_workdir(config: Config) -> Optional[TrainingState]:
  """Like `check_workdir`, but --fresh also deletes the old checkpoints."""
  if config.fresh and os.path.isdir(checkpoint_dir(config.workdir)):
    logging.info("--fresh: deleting %s", checkpoint_dir(config.workdir))
    remove_checkpoints(config.workdir)
  return check_workdir(config)


def remove_checkpoints(workdir: str) -> None:
  """Deletes the checkpoints, the pointer first: a kill midway leaves no
  pointer to a missing file."""
  folder = checkpoint_dir(workdir)
  pointer = os.path.join(folder, POINTER_FILE)
  if os.path.exists(pointer):
    os.remove(pointer)
  shutil.rmtree(folder, ignore_errors=True)


def restore(model: keras.Model, plan: stages.StagePlan, state: TrainingState,
            folder: str) -> None:
  """Puts `model` in the saved stage, then loads weights and optimizer from
  the checkpoint `folder`.

  The order matters (DESIGN.md, trap 2): the optimizer must be built on the
  stage's trainable variables before its saved variables can be loaded.
  """
  stages.apply_stage(model, plan, state.stage)
  num_variables = len(model.optimizer.variables)
  if num_variables != state.num_optimizer_variables:
    raise UserError(
        f"{folder}: the checkpoint's optimizer has "
        f"{state.num_optimizer_variables} variables, the model's optimizer "
        f"in stage {state.stage!r} has {num_variables}: it was written by "
        "another version of tf_finetune. Pass --fresh to start over.")
  path = os.path.join(folder, state.file)
  try:
    model.load_weights(path)
  except Exception as e:  # h5py OSError, Keras ValueError: all "unusable".
    raise UserError(
        f"Cannot load the checkpoint {path} "
        f"({type(e).__name__}: {str(e).strip()[:300]}). Pass --fresh to "
        "start over.") from e
  logging.info("Resuming from %s, %s (stage %r).", path,
               describe_position(state.epoch, state.step, plan.total_epochs),
               state.stage)


def restore_best(best, state: TrainingState, folder: str) -> None:
  """Gives a `selection.BestWeights` the best epoch of the checkpoint."""
  best.load(state.best, state.best_file and os.path.join(folder,
                                                         state.best_file))


def describe_position(epoch: int, step: int, total_epochs: int) -> str:
  """'after epoch 2/4' at an epoch boundary, else 'at epoch 3/4, step 5'
  (1-based epochs, as Keras prints them)."""
  if step == 0:
    return f"after epoch {epoch}/{total_epochs}"
  return f"at epoch {epoch + 1}/{total_epochs}, step {step}"


@dataclasses.dataclass(frozen=True)
class FitSegment:
  """One `model.fit` call: epochs [initial_epoch, epochs), first skipping
  `skip_batches` batches of the training data."""
  initial_epoch: int
  epochs: int
  skip_batches: int


def fit_segments(state: Optional[TrainingState], total_epochs: int,
                 split_at: int = 0) -> List[FitSegment]:
  """The fits that train what is left after `state`.

  Keras runs every epoch of one `fit` over the whole dataset, so an epoch
  interrupted at step S is finished by a fit of its own over the dataset
  without its first S batches; the remaining epochs follow in a second fit.
  A fit that would run across epoch `split_at` (> 0) is split there: stage
  head on cached features and stage finetune on images are different fits.
  """
  epoch, step = (state.epoch, state.step) if state else (0, 0)
  segments = []
  if step > 0 and epoch < total_epochs:
    segments.append(FitSegment(epoch, epoch + 1, step))
    epoch += 1
  if 0 < split_at < total_epochs and epoch < split_at:
    segments.append(FitSegment(epoch, split_at, 0))
    epoch = split_at
  if epoch < total_epochs:
    segments.append(FitSegment(epoch, total_epochs, 0))
  return segments


def trim_csv_log(path: str, first_epoch: int) -> None:
  """Drops the rows of epochs >= `first_epoch` from a CSVLogger file.

  They were logged after the checkpoint being resumed from and are trained
  again, so the log keeps one row per epoch.
  """
  if not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  if not lines:
    return
  kept = [lines[0]] + [line for line in lines[1:]
                       if line and int(line.split(",", 1)[0]) < first_epoch]
  write_text_atomic(path, "\n".join(kept) + "\n")


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to a temp file beside `path`, syncs it, renames it into
  place and syncs the folder: after a crash, or a power cut, `path` holds
  the old or the new text, never a mix."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=_TEMP_PREFIX,
                             suffix=os.path.basename(path))
  try:
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from others.
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _sync_folder(folder)


def _sync_folder(folder: str) -> None:
  fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _sync_file(path: str) -> None:
  with open(path, "rb") as f:
    os.fsync(f.fileno())


class Checkpointer(keras.callbacks.Callback):
  """Saves the training state; stops on a non-finite loss or on SIGTERM.

  A checkpoint is written at the end of every epoch and, with
  `save_every_steps=N`, after every N-th training step (counted over the
  whole run). Before each save the loss is checked: a NaN or infinite loss
  raises `TrainingDiverged` naming stage, epoch and step, so the last
  checkpoint, written before it, stays the newest. A checkpoint is never
  written with non-finite weights either.

  Inside `catch_sigterm()`, SIGTERM only sets a flag; the next step end
  saves a checkpoint and raises `Preempted` (after an epoch's last step,
  the epoch's validation runs first).

  Args:
    workdir: the run's WORKDIR.
    config: the run's Config (for the fingerprint and save_every_steps).
    stage_callback: whose records go into each checkpoint.
    steps_per_epoch: training batches per epoch.
    start: the state being resumed from, or None.
    model: the model to save; None: the model being fit. Stage head on
      cached features fits a head model that shares the full model's layers
      and optimizer (features.py); the checkpoint must hold the full model.
    unsaved_epochs: epochs whose end writes no checkpoint (SIGTERM and
      --save_every_steps still do). Stage head on cached features passes all
      its epochs but the last: each takes less time than writing the whole
      model (~95 MB for ResNet50), and a resumed run recomputes the features
      anyway.
  """

  def __init__(self, workdir: str, config: Config,
               stage_callback: stages.TwoStageCallback, steps_per_epoch: int,
               start: Optional[TrainingState] = None,
               model: Optional[keras.Model] = None,
               unsaved_epochs: Sequence[int] = (), best=None):
    super().__init__()
    self._saved_model = model
    self.best = best
    self._best_file = start.best_file if start else None
    self._best_id = best.snapshot_id() if best is not None else None
    self.unsaved_epochs = frozenset(unsaved_epochs)
    self.workdir = workdir
    self.folder = checkpoint_dir(workdir)
    self.fingerprint = fingerprint(config)
    self.save_every_steps = config.save_every_steps
    self.stage_callback = stage_callback
    self.plan = stage_callback.plan
    self.steps_per_epoch = steps_per_epoch
    self._pending_offset = start.step if start else 0
    self._offset = 0
    self._epoch = start.epoch if start else 0
    self._sigterm = False

  def set_model(self, model):
    super().set_model(model if self._saved_model is None
                      else self._saved_model)

  def catch_sigterm(self):
    """Context manager: SIGTERM means "checkpoint and stop" while inside."""
    return _SigtermFlag(self)

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch
    # Only the first epoch after a mid-epoch resume starts at a later step.
    self._offset, self._pending_offset = self._pending_offset, 0

  def on_train_batch_end(self, batch, logs=None):
    step = self._offset + batch + 1
    self._check_loss(logs, step)
    if step >= self.steps_per_epoch:
      return  # on_epoch_end saves after validation.
    if self._sigterm:
      self.save(self._epoch, step)
      self._raise_preempted(self._epoch, step)
    global_step = self._epoch * self.steps_per_epoch + step
    if self.save_every_steps and global_step % self.save_every_steps == 0:
      self.save(self._epoch, step)

  def on_epoch_end(self, epoch, logs=None):
    if self._sigterm or epoch not in self.unsaved_epochs:
      self.save(epoch + 1, 0)
    if self._sigterm:
      self._raise_preempted(epoch + 1, 0)

  def save(self, epoch: int, step: int) -> None:
    """Writes the weights file, then the pointer naming it, then deletes
    the files no pointer names."""
    stage = self.stage_callback.stage
    self._check_weights(epoch, step)
    os.makedirs(self.folder, exist_ok=True)
    name = f"ckpt-{epoch:04d}-{step:06d}.weights.h5"
    # Keras insists on the .weights.h5 ending, so the marker is a prefix.
    tmp = os.path.join(self.folder, f"{_TEMP_PREFIX}{os.getpid()}-{name}")
    try:
      self.model.save_weights(tmp)
      _sync_file(tmp)
      os.replace(tmp, os.path.join(self.folder, name))
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    self._save_best(epoch, step)
    state = TrainingState(
        epoch=epoch, step=step, stage=stage,
        records=self.stage_callback.records_state(), file=name,
        num_optimizer_variables=len(self.model.optimizer.variables),
        fingerprint=self.fingerprint,
        best=self.best.state() if self.best else None,
        best_file=self._best_file)
    write_text_atomic(os.path.join(self.folder, POINTER_FILE), json.dumps(
        {"format": _FORMAT, **dataclasses.asdict(state)}, indent=1))
    self._remove_other_files(name, self._best_file)

  def _save_best(self, epoch: int, step: int) -> None:
    """Writes the best epoch's weights when they changed since the last
    checkpoint (most checkpoints of a long stage reuse the file)."""
    if self.best is None or self.best.snapshot_id() in (None, self._best_id):
      return
    name = f"best-{epoch:04d}-{step:06d}.npz"
    tmp = os.path.join(self.folder, f"{_TEMP_PREFIX}{os.getpid()}-{name}")
    try:
      self.best.save_snapshot(tmp)
      _sync_file(tmp)
      os.replace(tmp, os.path.join(self.folder, name))
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    self._best_file, self._best_id = name, self.best.snapshot_id()

  def _remove_other_files(self, *kept: str) -> None:
    for name in os.listdir(self.folder):
      if name not in (*kept, POINTER_FILE):
        os.remove(os.path.join(self.folder, name))

  def _where(self, epoch: int, step: int) -> str:
    return (f"stage {self.plan.stage_at(epoch)!r}, epoch {epoch + 1}/"
            f"{self.plan.total_epochs}, step {step}/{self.steps_per_epoch}")

  def _kept(self) -> str:
    state = read_state(self.workdir)
    if state is None:
      return "No checkpoint had been written yet."
    position = describe_position(state.epoch, state.step,
                                 self.plan.total_epochs)
    return (f"The last checkpoint, written before that ({position}), is "
            f"kept in {self.folder}.")

  def _check_loss(self, logs, step: int) -> None:
    loss = (logs or {}).get("loss")
    if loss is not None and not np.isfinite(float(loss)):
      raise TrainingDiverged(
          f"The training loss became {float(loss)} at "
          f"{self._where(self._epoch, step)}. {self._kept()} Lower "
          f"--{self.plan.stage_at(self._epoch)}_learning_rate and rerun "
          "with --fresh.")

  def _check_weights(self, epoch: int, step: int) -> None:
    bad = [v.path for v in self.model.weights
           if not np.all(np.isfinite(v.numpy()))]
    if bad:
      stage = self.stage_callback.stage
      position = describe_position(epoch, step, self.plan.total_epochs)
      raise TrainingDiverged(
          f"Weights became NaN or infinite ({', '.join(bad[:3])}) in stage "
          f"{stage!r}, {position}. {self._kept()} Lower "
          f"--{stage}_learning_rate and rerun with --fresh.")

  def _raise_preempted(self, epoch: int, step: int) -> None:
    position = describe_position(epoch, step, self.plan.total_epochs)
    raise Preempted(
        f"stopped by SIGTERM; checkpoint saved {position} in {self.folder}. "
        "Rerun the same command to resume.")


class _SigtermFlag:
  """Routes SIGTERM to the checkpointer's flag; restores the old handler."""

  def __init__(self, checkpointer: Checkpointer):
    self.checkpointer = checkpointer
    self.previous = None

  def __enter__(self):
    def handle(signum, frame):
      logging.warning("SIGTERM: saving a checkpoint after this step.")
      self.checkpointer._sigterm = True
    try:
      self.previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # Not the main thread: signals cannot be caught.
      logging.warning("Not in the main thread: SIGTERM will not checkpoint.")
    return self

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)
    return False


class EpochProgress(keras.callbacks.ProgbarLogger):
  """Keras' progress lines, numbered against the run's total epochs: the
  fit that finishes an interrupted epoch would otherwise print 'Epoch 3/3'
  for the third of four epochs."""

  def __init__(self, total_epochs: int):
    super().__init__()
    self.total_epochs = total_epochs

  def set_params(self, params):
    super().set_params({**params, "epochs": self.total_epochs})


def count_steps(num_examples: int, batch_size: int) -> int:
  """Training batches per epoch (the last batch may be partial)."""
  return math.ceil(num_examples / batch_size)

"""Checkpoints: a run that dies resumes where it stopped, in the right stage.

Design notes: ARCHITECTURE.md, "Module notes", `checkpoints.py`.
"""

import dataclasses
import os
import signal
import time
import uuid
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np
from absl import logging

from tf_finetune import config as config_lib
from tf_finetune import files, selection, stages, stop_signals
from tf_finetune import model as model_lib
from tf_finetune.config import Config, TrainingDiverged, UserError

CHECKPOINT_DIR = "checkpoints"
POINTER_FILE = "checkpoint.json"
_FORMAT = 1


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
    fingerprint: the run-defining flags (`config.fingerprint`).
    run_id: the same for every checkpoint of one run, resumptions included;
      a new run (a fresh start, --fresh) gets a new one. "" when a pointer
      has none: its run is then not recognised by its export.
    best: the best epoch so far (`selection.BestWeights.state`), or None.
    best_file: the file of its weights inside the checkpoint folder.
    seed_states: `model.seed_states(model)` when saved; None in older pointers.
  """
  epoch: int
  step: int
  stage: str
  records: List[stages.StageRecord]
  file: str
  num_optimizer_variables: int
  fingerprint: Dict
  run_id: str = ""
  best: Optional[selection.KeptState] = None
  best_file: Optional[str] = None
  seed_states: Optional[List[List[int]]] = None

  def to_json(self) -> Dict:
    """The pointer's fields, as JSON values."""
    payload = dataclasses.asdict(self)
    payload["records"] = [r.to_state() for r in self.records]
    payload["best"] = None if self.best is None else self.best.to_json()
    return payload

  @classmethod
  def from_json(cls, payload: Dict) -> "TrainingState":
    """Reads `to_json`'s values; raises KeyError, TypeError on others."""
    payload = dict(payload)
    payload["records"] = [stages.StageRecord.from_state(r)
                          for r in payload["records"]]
    if payload.get("best") is not None:
      payload["best"] = selection.KeptState.from_json(payload["best"])
    return cls(**payload)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_DIR)


def read_state(workdir: str) -> Optional[TrainingState]:
  """The state of WORKDIR's last checkpoint, or None when there is none."""
  path = os.path.join(checkpoint_dir(workdir), POINTER_FILE)
  if not files.exists(path):
    return None
  try:
    payload = files.read_json(path)
    if payload.get("format") != _FORMAT:
      raise ValueError(f"unknown format {payload.get('format')!r}")
    payload.pop("format")
    return TrainingState.from_json(payload)
  except (ValueError, TypeError, AttributeError, KeyError) as e:
    raise UserError(f"--workdir={workdir!r}: {path} is not a checkpoint "
                    f"pointer this version can read ({e}). Pass --fresh to "
                    "delete the checkpoints and start over.") from e


def write_pointer(folder: str, state: TrainingState) -> None:
  """Writes the pointer naming `state`'s files, which must be complete."""
  files.write_json_atomic(os.path.join(folder, POINTER_FILE),
                          {"format": _FORMAT, **state.to_json()},
                          indent=1)


def copy_checkpoint(source: str, workdir: str, state: TrainingState,
                    fingerprint: Dict) -> TrainingState:
  """Copies `state`, the checkpoint of workdir `source`, into WORKDIR's
  checkpoint folder as the start of another run, whose `fingerprint` it
  then carries (and a run id of its own); returns the copy's state."""
  folder = checkpoint_dir(workdir)
  files.makedirs(folder)
  for name in filter(None, (state.file, state.best_file)):
    files.copy_atomic(os.path.join(checkpoint_dir(source), name),
                      os.path.join(folder, name))
  copied = dataclasses.replace(state, fingerprint=fingerprint,
                               run_id=uuid.uuid4().hex)
  write_pointer(folder, copied)  # Last: it names complete files only.
  return copied


def read_run_id(workdir: str) -> Optional[str]:
  """The id of the run whose checkpoints are in WORKDIR, or None.

  The export records it (export.export_saved_model's `run_id`), so a run
  killed after exporting and rerun finds its version instead of exporting
  another: the rerun resumes from the same checkpoints, hence the same id.
  """
  state = read_state(workdir)
  return state.run_id if state is not None and state.run_id else None


def remove_checkpoints(workdir: str) -> None:
  """Deletes the checkpoints, the pointer first: a kill midway leaves no
  pointer to a missing file."""
  folder = checkpoint_dir(workdir)
  files.remove(os.path.join(folder, POINTER_FILE))
  files.remove_tree(folder)


def restore(model: keras.Model, plan: stages.StagePlan, resume: TrainingState,
            folder: str) -> None:
  """Puts `model` in the saved stage, then loads weights and optimizer from
  the checkpoint `folder`.

  The order matters: the optimizer must be built on the stage's trainable
  variables before its saved variables can be loaded, because a Keras 3
  optimizer refuses variables it was not built with (ARCHITECTURE.md).
  """
  stages.apply_stage(model, plan, resume.stage)
  num_variables = len(model.optimizer.variables)
  if num_variables != resume.num_optimizer_variables:
    raise UserError(
        f"{folder}: the checkpoint's optimizer has "
        f"{resume.num_optimizer_variables} variables, the model's optimizer "
        f"in stage {resume.stage!r} has {num_variables}: it was written by "
        "another version of tf_finetune. Pass --fresh to start over.")
  path = os.path.join(folder, resume.file)
  try:
    model.load_weights(path)
  except Exception as e:  # h5py OSError, Keras ValueError: all "unusable".
    raise UserError(
        f"Cannot load the checkpoint {path} "
        f"({type(e).__name__}: {str(e).strip()[:300]}). Pass --fresh to "
        "start over.") from e
  if resume.seed_states is not None:
    model_lib.restore_seed_states(model, resume.seed_states)
  logging.info("Resuming from %s, %s (stage %r).", path,
               describe_position(resume.epoch, resume.step, plan.total_epochs),
               resume.stage)


def restore_best(best, resume: TrainingState, folder: str) -> None:
  """Gives a `selection.BestWeights` the best epoch of the checkpoint."""
  best.load(resume.best, resume.best_file and os.path.join(
      folder, resume.best_file))


def describe_position(epoch: int, step: int, total_epochs: int) -> str:
  """'after epoch 2/4' at an epoch boundary, else 'at epoch 3/4, step 5'
  (1-based epochs, as Keras prints them)."""
  if step == 0:
    return f"after epoch {epoch}/{total_epochs}"
  return f"at epoch {epoch + 1}/{total_epochs}, step {step}"


class Checkpointer(keras.callbacks.Callback):
  """Saves the training state; stops on a non-finite loss, SIGTERM, SIGINT.

  A checkpoint is written at the end of an epoch when
  `save_interval_seconds` have passed since the last one (always at the end
  of a stage and of a fit), and, with `save_every_steps=N`, after every
  N-th training step (counted over the whole run). On small data an epoch
  takes a second or two and writing ResNet50 with Adam's moments about as
  long, so a checkpoint per epoch made stage finetune 1.7 times slower; by
  time, a hard kill loses at most that interval (TF Estimator's
  `save_checkpoints_secs` does the same). Before each save the loss is
  checked: a NaN or infinite loss raises `TrainingDiverged` naming stage,
  epoch and step, so the last checkpoint, written before it, stays the
  newest. A checkpoint is never written with non-finite weights either.

  Inside `catch_stop_signals()`, SIGTERM and SIGINT (Ctrl-C) only set a
  flag; the next step end saves a checkpoint and raises `StoppedBySignal`
  (after an epoch's last step, the epoch's validation runs first). A second
  Ctrl-C while waiting for that raises KeyboardInterrupt at once, keeping
  the checkpoint before.

  Every checkpoint carries the run id (`read_run_id`), kept on resume.

  Args:
    workdir: the run's WORKDIR.
    config: the run's Config (for the fingerprint, save_every_steps and
      save_interval_seconds).
    stage_callback: whose records go into each checkpoint.
    steps_per_epoch: training batches per epoch.
    resume: the checkpoint's state being resumed from, or None.
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
               resume: Optional[TrainingState] = None,
               model: Optional[keras.Model] = None,
               unsaved_epochs: Sequence[int] = (), best=None):
    super().__init__()
    self.save_interval_seconds = config.save_interval_seconds
    self._last_save = time.monotonic()
    # The last epoch whose end was not saved because the interval had not
    # passed; saved when the fit ends (an early stop, a segment's end).
    self._unsaved_end: Optional[int] = None
    self._saved_model = model
    self.best = best
    self._best_file = resume.best_file if resume else None
    self._best_id = best.snapshot_id() if best is not None else None
    self.unsaved_epochs = frozenset(unsaved_epochs)
    self.workdir = workdir
    self.folder = checkpoint_dir(workdir)
    self.fingerprint = config_lib.fingerprint(config)
    self.save_every_steps = config.save_every_steps
    self.stage_callback = stage_callback
    self.plan = stage_callback.plan
    self.steps_per_epoch = steps_per_epoch
    self._pending_offset = resume.step if resume else 0
    self._offset = 0
    self._epoch = resume.epoch if resume else 0
    self.run_id = (resume.run_id if resume and resume.run_id
                   else uuid.uuid4().hex)
    self.stop_signal: Optional[int] = None

  def set_model(self, model):
    super().set_model(model if self._saved_model is None
                      else self._saved_model)

  def catch_stop_signals(self):
    """Context manager: SIGTERM and SIGINT mean "checkpoint and stop" while
    inside; the previous handlers are restored on exit."""
    return stop_signals.StopSignals(self)

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch
    # Only the first epoch after a mid-epoch resume starts at a later step.
    self._offset, self._pending_offset = self._pending_offset, 0

  def on_train_batch_end(self, batch, logs=None):
    step = self._offset + batch + 1
    self._check_loss(logs, step)
    if step >= self.steps_per_epoch:
      return  # on_epoch_end saves after validation.
    if self.stop_signal is not None:
      self.save(self._epoch, step)
      self._raise_stopped(self._epoch, step)
    if self._step_save_due(self._epoch, step):
      self.save(self._epoch, step)

  def on_epoch_end(self, epoch, logs=None):
    if self.stop_signal is not None:
      self.save(epoch + 1, 0)
      self._raise_stopped(epoch + 1, 0)
    if epoch in self.unsaved_epochs:
      return
    if self._due(epoch):
      self.save(epoch + 1, 0)
    else:
      self._unsaved_end = epoch

  def on_train_end(self, logs=None):
    if self._unsaved_end is not None:
      self.save(self._unsaved_end + 1, 0)

  def _due(self, epoch: int) -> bool:
    """Whether the end of `epoch` is checkpointed (class docstring)."""
    if self._step_save_due(epoch, self.steps_per_epoch):
      return True  # The step save of the epoch's last step, after validation.
    waited = time.monotonic() - self._last_save
    return (not self.save_interval_seconds or self.plan.ends_stage(epoch)
            or waited >= self.save_interval_seconds)

  def _step_save_due(self, epoch: int, step: int) -> bool:
    """Whether `--save_every_steps` asks for a checkpoint after `step` of
    `epoch` (steps counted over the whole run)."""
    every = self.save_every_steps
    return bool(every) and (epoch * self.steps_per_epoch + step) % every == 0

  def save(self, epoch: int, step: int) -> None:
    """Writes the weights file, then the pointer naming it, then deletes
    the files no pointer names."""
    stage = self.stage_callback.stage
    self._check_weights(epoch, step)
    name = f"ckpt-{epoch:04d}-{step:06d}.weights.h5"
    with files.atomic_output(os.path.join(self.folder, name)) as temp:
      self.model.save_weights(temp)
    self._save_best(epoch, step)
    state = TrainingState(
        epoch=epoch, step=step, stage=stage,
        records=self.stage_callback.records_state(), file=name,
        num_optimizer_variables=len(self.model.optimizer.variables),
        fingerprint=self.fingerprint, run_id=self.run_id,
        best=self.best.state() if self.best else None,
        best_file=self._best_file,
        seed_states=model_lib.seed_states(self.model))
    write_pointer(self.folder, state)
    self._remove_other_files(name, self._best_file)
    self._last_save, self._unsaved_end = time.monotonic(), None

  def _save_best(self, epoch: int, step: int) -> None:
    """Writes the best epoch's weights when they changed since the last
    checkpoint (most checkpoints of a long stage reuse the file)."""
    if self.best is None or self.best.snapshot_id() in (None, self._best_id):
      return
    name = f"best-{epoch:04d}-{step:06d}.npz"
    with files.atomic_output(os.path.join(self.folder, name)) as temp:
      self.best.save_snapshot(temp)
    self._best_file, self._best_id = name, self.best.snapshot_id()

  def _remove_other_files(self, *kept: str) -> None:
    for name in files.listdir(self.folder):
      if name not in (*kept, POINTER_FILE):
        files.remove(os.path.join(self.folder, name))

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

  def _raise_stopped(self, epoch: int, step: int) -> None:
    position = describe_position(epoch, step, self.plan.total_epochs)
    name = signal.Signals(self.stop_signal).name
    raise stop_signals.StoppedBySignal(
        f"stopped by {name}; checkpoint saved {position} in {self.folder}. "
        "Rerun the same command to resume.", self.stop_signal)

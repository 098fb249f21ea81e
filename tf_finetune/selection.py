"""Model selection: the weights kept are those of the best validation epoch
over both stages, so fine-tuning never leaves a model worse than its head.

Design notes: ARCHITECTURE.md, "Module notes", `selection.py`.
"""

import dataclasses
import io
import math
from typing import Dict, Optional

import keras
import numpy as np
from absl import logging

from tf_finetune import files, stages


@dataclasses.dataclass(frozen=True)
class KeptEpoch:
  """The best epoch so far: the one whose weights are kept.

  Attributes:
    epoch: its 0-based index over both stages.
    stage: its stage.
    monitor: the logs key compared, e.g. "val_accuracy".
    value: its value of `monitor`.
    val_loss: its validation loss (NaN without one), which breaks ties.
    measure: what `monitor` measures when its name does not say it.
  """
  epoch: int
  stage: str
  monitor: str
  value: float
  val_loss: float
  measure: Optional[str] = None

  def to_json(self) -> Dict:
    """report.json's "kept" (`measure` only when set)."""
    kept = dataclasses.asdict(self)
    if self.measure is None:
      del kept["measure"]
    return kept


@dataclasses.dataclass(frozen=True)
class KeptState:
  """What a checkpoint keeps of a `BestWeights`.

  Attributes:
    kept: the best epoch so far.
    stage_started: the stage whose start last snapshotted the variables.
  """
  kept: KeptEpoch
  stage_started: str

  def to_json(self) -> Dict:
    return {**self.kept.to_json(), "stage_started": self.stage_started}

  @classmethod
  def from_json(cls, entry: Dict) -> "KeptState":
    entry = dict(entry)
    stage_started = entry.pop("stage_started")
    return cls(KeptEpoch(**entry), stage_started)


def objective_direction(objective: str) -> str:
  """"min" for a loss, else "max"."""
  return "min" if objective.endswith("loss") else "max"


class BestWeights(keras.callbacks.Callback):
  """Keeps the best epoch's weights and restores them at each stage end.

  Must come after the `TwoStageCallback` in the callback list (it snapshots
  the variables the stage made trainable) and before the checkpointer (so a
  stage's last checkpoint holds the restored weights).

  Args:
    plan: the stage plan.
    monitor: the logs key to watch, e.g. "val_accuracy".
    mode: "max" or "min".
    model: the model whose weights are kept, whatever model is being fit
      (stage head on cached features fits a head model sharing this model's
      layers).
    measure: what `monitor` measures when its name does not say it, e.g.
      a balanced accuracy under class weighting (weighting.py); named in
      the log and in `best`.
  """

  def __init__(self, plan: stages.StagePlan, model: keras.Model,
               monitor: str = "val_accuracy", mode: str = "max",
               measure: Optional[str] = None):
    super().__init__()
    self.plan = plan
    self.monitor = monitor
    self.measure = measure
    self.sign = 1.0 if mode == "max" else -1.0
    self._kept_model = model
    self.best: Optional[KeptEpoch] = None
    self._values: Dict[str, np.ndarray] = {}
    self._stage: Optional[str] = None  # The stage the snapshot started in.

  def set_model(self, model):
    super().set_model(self._kept_model)

  def on_epoch_begin(self, epoch, logs=None):
    stage = self.plan.stage_at(epoch)
    if stage != self._stage:
      # The model holds the best weights so far here (the previous stage
      # ended by restoring them): these are the variables that move now.
      self._copy_trainable()
      self._stage = stage

  def on_epoch_end(self, epoch, logs=None):
    logs = logs or {}
    if self.monitor in logs and self._improves(logs):
      self._copy_trainable()
      self.best = KeptEpoch(
          epoch, self.plan.stage_at(epoch), self.monitor,
          float(logs[self.monitor]), float(logs.get("val_loss", math.nan)),
          self.measure or None)
    if self.plan.ends_stage(epoch):
      self.restore(f"end of stage {self.plan.stage_at(epoch)}")

  def on_train_end(self, logs=None):
    # An early stop (EarlyStopping in a search trial) ends the run before
    # its last epoch: the trial's model is its best epoch, as in training.
    if getattr(self.model, "stop_training", False):
      self.restore("early stop")

  def restore(self, why: str) -> None:
    """Assigns the best weights to the model (nothing before any best)."""
    if self.best is None:
      return
    for variable in self.model.weights:
      if variable.path in self._values:
        variable.assign(self._values[variable.path])
    logging.info("%s: keeping the weights of epoch %d (stage %s, %s %.4f).",
                 why.capitalize(), self.best.epoch + 1, self.best.stage,
                 self.measure or self.monitor, self.best.value)

  def _improves(self, logs) -> bool:
    if self.best is None:
      return True
    value = self.sign * float(logs[self.monitor])
    best = self.sign * self.best.value
    if value != best:
      return value > best
    return float(logs.get("val_loss", math.inf)) < self.best.val_loss

  def _copy_trainable(self) -> None:
    for variable in self.model.trainable_variables:
      self._values[variable.path] = keras.ops.convert_to_numpy(variable)

  # Checkpoints: a resumed run keeps the best of the epochs before it.
  def state(self) -> Optional[KeptState]:
    """What a checkpoint keeps (None before any epoch)."""
    return None if self.best is None else KeptState(self.best, self._stage)

  def snapshot_id(self) -> Optional[tuple]:
    """Changes whenever the values `save_snapshot` writes change."""
    return None if self.best is None else (self.best.epoch, self._stage)

  def save_snapshot(self, path: str) -> None:
    with open(path, "wb") as f:  # A file object: savez would append ".npz".
      np.savez(f, **{_key(p): v for p, v in self._values.items()})

  def load(self, state: Optional[KeptState], path: Optional[str]) -> None:
    """Continues from `state()` and the file `save_snapshot` wrote."""
    if state is None:
      return
    self._stage = state.stage_started
    self.best = state.kept
    # np.load reads local files only; the checkpoint may be on gs://.
    with np.load(io.BytesIO(files.read_bytes(path))) as arrays:
      by_key = {_key(v.path): v.path for v in self._kept_model.weights}
      self._values = {by_key[k]: arrays[k] for k in arrays.files}


def _key(variable_path: str) -> str:
  # npz keys become file names inside the archive: no slashes.
  return variable_path.replace("/", "|")

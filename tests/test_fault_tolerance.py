"""Fault tolerance: resume after a kill, SIGTERM, SIGINT (Ctrl-C), NaN,
crashes mid-write, unsafe model files, and a workdir holding another run's
checkpoints.

The kill/resume chain drives the real command line and the real ResNet50
(32 px, a local weights file, 18 training images); the rest uses a tiny
stand-in model with the same nested "backbone" and block names, through
the same `train.start_stages` / `train.fit_remaining` code.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import another_value, write_backbone_weights
from tf_finetune import checkpoints, config as config_lib, data, export, report
from tf_finetune import fit_plan, saved_models, stages, stop_signals, train
from tf_finetune import training_logs
from tf_finetune import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The command line killed and rerun: the tests using it are `slow`
# (conftest.py).
SLOW_FIXTURES = {"killed_and_resumed"}

# ------------------------------------------------------------- tiny model

TINY_STEPS = 4  # batches per epoch
TINY_BATCH = 4


def build_tiny_model():
  """A model shaped like model.build_model: a nested 'backbone' whose layer
  names carry ResNet50 block names, and a 'classifier' head."""
  keras.utils.set_random_seed(3)
  inputs = keras.Input((6,))
  x = keras.layers.Dense(8, activation="relu", name="conv4_block6_1_conv")(
      inputs)
  x = keras.layers.Dense(8, activation="relu", name="conv5_block3_1_conv")(x)
  backbone = keras.Model(inputs, x, name="backbone")
  outer = keras.Input((6,))
  # "pool": what stage head on cached features caches (model.FEATURES_NAME).
  features = keras.layers.Identity(name="pool")(backbone(outer))
  features = keras.layers.Normalization(name="standardize")(features)
  outputs = keras.layers.Dense(3, activation="softmax", name="classifier")(
      features)
  return keras.Model(outer, outputs)


def epochs_of(batches):
  """`Datasets.train_from` of a stand-in: one pass of `batches` per epoch."""
  return lambda first_epoch, end_epoch: batches.repeat(end_epoch - first_epoch)


def tiny_datasets():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(TINY_STEPS * TINY_BATCH, 6)).astype("float32")
  y = (np.arange(len(x)) % 3).astype("int32")
  # No shuffling: an uninterrupted run and a resumed one see the same
  # batches, so their final weights can be compared bit for bit.
  train_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(TINY_BATCH)
  return data.Datasets(train=train_ds, train_from=epochs_of(train_ds),
                       val=train_ds.take(1), test=None,
                       class_names=["a", "b", "c"],
                       num_examples={"train": len(x), "val": TINY_BATCH},
                       skipped_files=[])


def tiny_config(workdir, **overrides):
  """A Config for the tiny model; every epoch's end checkpoints (the tests
  that pin the interval set `save_interval_seconds`)."""
  values = dict(workdir=str(workdir), weights="none", head_epochs=1,
                finetune_epochs=2, finetune_min_steps=0,
                head_learning_rate=1e-2, finetune_learning_rate=1e-3,
                unfreeze_blocks=1, batch_size=TINY_BATCH, save_every_steps=1,
                save_interval_seconds=0)
  values.update(overrides)
  return config_lib.Config(**values).validate()


class CrashAt(keras.callbacks.Callback):
  """Simulates a crash before step `step` of `epoch` (0-based), keeping a
  copy of the state the last checkpoint holds."""

  def __init__(self, epoch, step):
    super().__init__()
    self.epoch, self.step, self.current = epoch, step, None

  def on_epoch_begin(self, epoch, logs=None):
    self.current = epoch

  def on_train_batch_begin(self, batch, logs=None):
    if (self.current, batch) == (self.epoch, self.step):
      self.weights = [v.numpy().copy() for v in self.model.weights]
      self.optimizer = [v.numpy().copy()
                        for v in self.model.optimizer.variables]
      raise RuntimeError("simulated crash")


class CountSteps(keras.callbacks.Callback):
  def __init__(self):
    super().__init__()
    self.steps = {}

  def on_epoch_begin(self, epoch, logs=None):
    self.current = epoch

  def on_train_batch_end(self, batch, logs=None):
    self.steps[self.current] = self.steps.get(self.current, 0) + 1


def tiny_run(config):
  """What `train.set_up_run` makes, with the tiny model and data."""
  plan = stages.StagePlan.from_config(config, steps_per_epoch=TINY_STEPS)
  return train.Run(config, None, plan, tiny_datasets(), build_tiny_model())


def run_tiny(config, extra=(), resume=None):
  """One training process of the tiny model: returns (model, stage callback)."""
  run = tiny_run(config)
  callback, best = train.start_stages(run, resume)
  train.fit_remaining(run, callback, best, resume, extra)
  return run.model, callback


@pytest.fixture(scope="module", params=[True, False],
                ids=["head_on_cached_features", "head_on_images"])
def uninterrupted(request, tmp_path_factory):
  """(weights, stage reports, --cache_features) of a run never stopped."""
  config = tiny_config(tmp_path_factory.mktemp("straight"),
                       cache_features=request.param)
  model, callback = run_tiny(config)
  return ([v.numpy() for v in model.weights], callback.stage_reports(),
          request.param)


def test_resume_mid_head_epoch_trains_as_if_never_stopped(tmp_path,
                                                          uninterrupted):
  weights, _, cached = uninterrupted
  config = tiny_config(tmp_path, cache_features=cached)
  with pytest.raises(RuntimeError, match="simulated crash"):
    run_tiny(config, [CrashAt(epoch=0, step=2)])
  state = workdir_lib.check_workdir(config)
  assert (state.epoch, state.step, state.stage) == (0, 2, "head")
  steps = CountSteps()
  model, callback = run_tiny(config, [steps], resume=state)
  assert steps.steps == {0: TINY_STEPS - 2, 1: TINY_STEPS, 2: TINY_STEPS}
  for expected, actual in zip(weights, model.weights):
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-6, atol=1e-7)
  head = callback.stage_reports()[0]
  assert head["input"] == ("cached_features" if cached else "images")


@pytest.mark.parametrize("cached, saved_after_epoch_0", [(True, False),
                                                          (False, True)])
def test_cached_head_epochs_are_checkpointed_at_the_stage_end(
    tmp_path, cached, saved_after_epoch_0):
  """A head epoch on cached features takes less than writing the model:
  only the end of stage head is checkpointed, not its other epochs."""
  config = tiny_config(tmp_path, head_epochs=2, save_every_steps=0,
                       cache_features=cached)
  with pytest.raises(RuntimeError, match="simulated crash"):
    run_tiny(config, [CrashAt(epoch=1, step=0)])
  state = workdir_lib.check_workdir(config)
  assert (state is not None) == saved_after_epoch_0
  with pytest.raises(RuntimeError, match="simulated crash"):
    run_tiny(config, [CrashAt(epoch=2, step=0)], resume=state)
  state = workdir_lib.check_workdir(config)
  assert (state.epoch, state.step, state.stage) == (2, 0, "head")


def test_resume_mid_finetune_restores_stage_weights_and_optimizer(
    tmp_path, uninterrupted):
  config = tiny_config(tmp_path, cache_features=uninterrupted[2])
  crash = CrashAt(epoch=1, step=2)  # stage "finetune", after its step 2
  with pytest.raises(RuntimeError, match="simulated crash"):
    run_tiny(config, [crash])
  state = workdir_lib.check_workdir(config)
  assert (state.epoch, state.step, state.stage) == (1, 2, "finetune")

  run = tiny_run(config)
  model = run.model
  callback, best = train.start_stages(run, state)
  # The finetune configuration, with the saved optimizer state in it.
  assert {v.path for v in model.trainable_variables} == {
      "conv5_block3_1_conv/kernel", "conv5_block3_1_conv/bias",
      "classifier/kernel", "classifier/bias"}
  # The finetune optimizer of the crashed run: 2 steps, not the head's 4.
  assert int(model.optimizer.iterations.numpy()) == 2
  for saved, restored in zip(crash.optimizer, model.optimizer.variables):
    np.testing.assert_array_equal(saved, restored.numpy())
  for saved, restored in zip(crash.weights, model.weights):
    np.testing.assert_array_equal(saved, restored.numpy())
  # The schedule goes on from the saved step count.
  np.testing.assert_allclose(float(model.optimizer.learning_rate),
                             float(run.plan.schedule_of("finetune")(2)))

  steps = CountSteps()
  train.fit_remaining(run, callback, best, state, [steps])
  # Only what was left: the rest of epoch 1, then epoch 2.
  assert steps.steps == {1: TINY_STEPS - 2, 2: TINY_STEPS}
  straight_weights, straight_reports, _ = uninterrupted
  for expected, actual in zip(straight_weights, model.weights):
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-6, atol=1e-7)
  reports = callback.stage_reports()
  assert [(r["name"], len(r["history"]["loss"])) for r in reports] == [
      ("head", 1), ("finetune", 2)]
  assert reports[1]["resumed_at"] == [{"epoch": 1, "step": 2}]
  assert "resumed_at" not in reports[0]
  for straight, resumed in zip(straight_reports, reports):
    assert straight["trainable_params"] == resumed["trainable_params"]
    assert straight["history"]["learning_rate"] == resumed["history"][
        "learning_rate"]


class CrashAtEnd(keras.callbacks.Callback):
  """Crashes at the end of the fit that ran the last of 3 epochs (stage head
  on cached features is a fit of its own)."""

  def on_epoch_end(self, epoch, logs=None):
    self.last_epoch = epoch

  def on_train_end(self, logs=None):
    if self.last_epoch == 2:
      raise RuntimeError("simulated crash after the last epoch")


def test_resume_after_the_last_epoch_trains_nothing(tmp_path, uninterrupted):
  config = tiny_config(tmp_path, save_every_steps=0,
                       cache_features=uninterrupted[2])
  with pytest.raises(RuntimeError, match="after the last epoch"):
    run_tiny(config, [CrashAtEnd()])
  state = workdir_lib.check_workdir(config)
  assert (state.epoch, state.step) == (3, 0)
  steps = CountSteps()
  model, callback = run_tiny(config, [steps], resume=state)
  assert steps.steps == {}
  assert [len(r["history"]["loss"]) for r in callback.stage_reports()] == [
      1, 2]
  for expected, actual in zip(uninterrupted[0], model.weights):
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-6, atol=1e-7)


class FakeClock:
  """Stands in for the `time` module in checkpoints.py: `seconds` pass at
  every epoch's end (`Tick`, which runs before the checkpointer)."""

  def __init__(self):
    self.now = 0.0

  def monotonic(self):
    return self.now


class Tick(keras.callbacks.Callback):
  def __init__(self, clock, seconds):
    super().__init__()
    self.clock, self.seconds = clock, seconds

  def on_epoch_end(self, epoch, logs=None):
    self.clock.now += self.seconds


@pytest.fixture
def clocked_saves(monkeypatch):
  """(a fake clock for checkpoints.py, the (epoch, step) of every checkpoint
  the runs write, in order)."""
  clock = FakeClock()
  monkeypatch.setattr(checkpoints, "time", clock)
  saved = []
  original = checkpoints.Checkpointer.save

  def save(self, epoch, step):
    saved.append((epoch, step))
    original(self, epoch, step)
  monkeypatch.setattr(checkpoints.Checkpointer, "save", save)
  return clock, saved


def interval_config(workdir, **overrides):
  """A tiny run whose epoch ends checkpoint once 60 s have passed."""
  return tiny_config(workdir, **{"save_every_steps": 0,
                                 "save_interval_seconds": 60,
                                 "cache_features": False, **overrides})


def test_epoch_ends_checkpoint_once_the_interval_passed(tmp_path,
                                                        clocked_saves):
  clock, saved = clocked_saves
  config = interval_config(tmp_path / "straight", finetune_epochs=6)
  straight, _ = run_tiny(config, [Tick(clock, 25)])
  # 25 s an epoch: stage head's only epoch (a stage end), then the first
  # epoch 60 s after that save (75 s), then the run's last epoch.
  assert saved == [(1, 0), (4, 0), (7, 0)]

  # A crash in epoch 6 resumes from the end of epoch 4 and ends where the
  # uninterrupted run ends.
  saved.clear()
  config = dataclasses.replace(config, workdir=str(tmp_path / "crashed"))
  with pytest.raises(RuntimeError, match="simulated crash"):
    run_tiny(config, [Tick(clock, 25), CrashAt(epoch=5, step=0)])
  assert saved == [(1, 0), (4, 0)]
  state = workdir_lib.check_workdir(config)
  assert (state.epoch, state.step) == (4, 0)
  resumed, _ = run_tiny(config, [Tick(clock, 25)], resume=state)
  for expected, actual in zip(straight.weights, resumed.weights):
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-6,
                               atol=1e-7)


def test_an_early_stop_between_checkpoints_saves_its_last_epoch(
    tmp_path, clocked_saves):
  clock, saved = clocked_saves

  class StopAfterEpoch3(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
      self.model.stop_training = epoch == 2

  config = interval_config(tmp_path, finetune_epochs=6)
  run_tiny(config, [Tick(clock, 25), StopAfterEpoch3()])
  # Epoch 3 ends 50 s after the last save: the end of the fit saves it.
  assert saved == [(1, 0), (3, 0)]
  assert workdir_lib.check_workdir(config).epoch == 3


def test_step_checkpoints_include_the_last_step_of_an_epoch(
    tmp_path, clocked_saves):
  _, saved = clocked_saves
  # Every 2 steps of 4 an epoch: steps 2 and 4 of each epoch, the 4th at
  # the epoch's end (after validation), though the interval never passes.
  run_tiny(interval_config(tmp_path, finetune_epochs=3, save_every_steps=2))
  assert saved == [(e, 2) if i % 2 == 0 else (e + 1, 0)
                   for e in range(4) for i in range(2)]


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
  config = tiny_config(tmp_path)
  with pytest.raises(RuntimeError):
    run_tiny(config, [CrashAt(epoch=0, step=2)])
  state = workdir_lib.check_workdir(config)
  path = tmp_path / "checkpoints" / state.file
  with open(path, "r+b") as f:
    f.truncate(100)  # e.g. a disk that lost the file's end
  with pytest.raises(config_lib.UserError) as raised:
    run_tiny(config, resume=state)
  assert str(path) in str(raised.value) and "--fresh" in str(raised.value)


def test_nan_loss_stops_naming_stage_epoch_step_and_keeps_checkpoint(tmp_path):
  # A huge learning rate makes the finetune stage diverge.
  config = tiny_config(tmp_path, finetune_learning_rate=1e38)
  with pytest.raises(config_lib.TrainingDiverged) as raised:
    run_tiny(config)
  message = str(raised.value)
  assert "stage 'finetune', epoch 2/3, step " in message
  assert "--finetune_learning_rate" in message
  assert isinstance(raised.value, config_lib.UserError)  # main: exit 2
  state = checkpoints.read_state(str(tmp_path))
  assert state is not None and state.epoch >= 1
  kept = checkpoints.describe_position(state.epoch, state.step, 3)
  assert f"({kept}), is kept in {tmp_path / 'checkpoints'}" in message
  # The kept checkpoint loads, in its stage, and holds finite weights only.
  run = tiny_run(config)
  train.start_stages(run, state)
  assert all(np.isfinite(v.numpy()).all() for v in run.model.weights)
  assert not os.path.exists(tmp_path / "report.json")


FORMAT1_CHECKPOINTS = os.path.join(os.path.dirname(__file__), "data",
                                   "checkpoints_format1")


def test_checkpoints_of_pointer_format_1_resume(tmp_path):
  """Checkpoints of a tiny run (head on cached features with the probe,
  killed twice in stage finetune) read, write back and resume unchanged."""
  folder = tmp_path / "checkpoints"
  shutil.copytree(FORMAT1_CHECKPOINTS, folder)
  with open(folder / checkpoints.POINTER_FILE) as f:
    pointer = json.load(f)
  # The run's own flags: --tuner's default has changed since it was written.
  config = tiny_config(tmp_path, head_epochs=2, finetune_epochs=2,
                       tuner="random")
  state = workdir_lib.check_workdir(config)
  assert {"format": 1, **state.to_json()} == pointer
  head, finetune = state.records
  assert (head.name, head.input, head.images) == ("head", "cached_features",
                                                 28)
  assert head.probe == pointer["records"][0]["probe"]
  assert finetune.resumed_at == [{"epoch": 2, "step": 1}]
  assert state.best.kept.stage == state.best.stage_started == "finetune"
  model, callback = run_tiny(config, resume=state)
  reports = callback.stage_reports()
  assert [len(r["history"]["loss"]) for r in reports] == [2, 2]
  assert reports[1]["resumed_at"] == [{"epoch": 2, "step": 1},
                                      {"epoch": 3, "step": 1}]
  assert reports[1]["seconds"] > pointer["records"][1]["_elapsed"]
  assert "_elapsed" not in reports[1] and "probe" in reports[0]
  assert all(np.isfinite(v.numpy()).all() for v in model.weights)


def test_workdir_of_another_run_is_refused_unless_fresh(tmp_path):
  config = tiny_config(tmp_path)
  with pytest.raises(RuntimeError):
    run_tiny(config, [CrashAt(epoch=0, step=2)])
  assert workdir_lib.check_workdir(config).step == 2
  # Speed and location flags may change on resume...
  same_run = tiny_config(tmp_path, jit_compile="true", save_every_steps=0,
                         strategy="one_device", top_k=1, cache_memory_mb=1)
  assert workdir_lib.check_workdir(same_run).step == 2
  # ...flags that change what is trained may not.
  other = tiny_config(tmp_path, finetune_learning_rate=1e-4, unfreeze_blocks=2)
  with pytest.raises(config_lib.UserError) as raised:
    workdir_lib.check_workdir(other)
  message = str(raised.value)
  assert "--finetune_learning_rate was 0.001, now 0.0001" in message
  assert "--unfreeze_blocks was 1, now 2" in message
  assert "--fresh" in message
  assert checkpoints.read_state(str(tmp_path)) is not None  # untouched
  fresh = tiny_config(tmp_path, unfreeze_blocks=2, fresh=True)
  assert workdir_lib.prepare_workdir(fresh) is None
  assert not os.path.exists(tmp_path / "checkpoints")


def test_training_and_search_resume_under_the_same_changes(tmp_path):
  from tf_finetune import tuning  # Imports KerasTuner: only here.
  config = tiny_config(tmp_path / "run")
  with pytest.raises(RuntimeError):
    run_tiny(config, [CrashAt(epoch=0, step=2)])
  search = dataclasses.replace(config, workdir=str(tmp_path / "search"),
                               mode="tune")
  tuning.prepare_project(search)
  resumable = config_lib.resumable_settings()
  assert {"save_every_steps", "max_trials"} <= resumable
  for field in dataclasses.fields(config):
    name = field.name
    if another_value(config, name) is None:
      continue
    training = dataclasses.replace(
        config, **{name: another_value(config, name)})
    searching = dataclasses.replace(
        search, **{name: another_value(search, name)})
    refused = []
    for check, changed in ((workdir_lib.check_workdir, training),
                           (tuning.prepare_project, searching)):
      try:
        check(changed)
        refused.append(False)
      except config_lib.UserError as e:
        assert f"--{name} was" in str(e)
        refused.append(True)
    assert refused == [name not in resumable] * 2, name


def test_fresh_is_not_recorded_in_flags_cfg(tmp_path):
  # Reusing flags.cfg as --flagfile after a crash must resume, not wipe.
  text = config_lib.to_flagfile(tiny_config(tmp_path, fresh=True))
  assert "--fresh" not in text
  assert "--save_every_steps=1" in text


@pytest.mark.parametrize("overrides, culprit", [
    ({"save_every_steps": -1}, "--save_every_steps=-1"),
    ({"fresh": True, "mode": "evaluate"}, "--fresh"),
    ({"weights": "/tmp/model.keras"}, "--weights='/tmp/model.keras'"),
    ({"weights": "/tmp/backbone.h5"}, "only weight files"),
])
def test_bad_fault_tolerance_flags_are_refused(overrides, culprit):
  with pytest.raises(config_lib.UserError) as raised:
    config_lib.Config(workdir="/tmp/w", **overrides).validate()
  assert culprit in str(raised.value)


def test_fit_segments_finish_an_interrupted_epoch_first():
  def state(epoch, step):
    return checkpoints.TrainingState(epoch, step, "head", [], "f", 0, {})
  segments = fit_plan.fit_segments
  assert segments(None, 4) == [fit_plan.FitSegment(0, 4, 0)]
  assert segments(state(2, 0), 4) == [fit_plan.FitSegment(2, 4, 0)]
  assert segments(state(2, 3), 4) == [fit_plan.FitSegment(2, 3, 3),
                                      fit_plan.FitSegment(3, 4, 0)]
  assert segments(state(3, 1), 4) == [fit_plan.FitSegment(3, 4, 1)]
  assert segments(state(4, 0), 4) == []


def test_csv_log_keeps_one_row_per_epoch_after_resume(tmp_path):
  path = str(tmp_path / "training.csv")
  with open(path, "w") as f:
    f.write("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n")
  training_logs.trim_csv_log(path, 2)
  with open(path) as f:
    assert f.read() == "epoch,loss\n0,1.0\n1,0.9\n"


class SendSigint(keras.callbacks.Callback):
  """Sends SIGINT to this process `times` times after step `step` of
  `epoch`, as Ctrl-C pressed in the terminal would."""

  def __init__(self, epoch, step, times=1):
    super().__init__()
    self.epoch, self.step, self.times, self.current = epoch, step, times, None

  def on_epoch_begin(self, epoch, logs=None):
    self.current = epoch

  def on_train_batch_end(self, batch, logs=None):
    if (self.current, batch + 1) == (self.epoch, self.step):
      for _ in range(self.times):
        os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_a_checkpoint_after_the_step_and_stops(tmp_path):
  config = tiny_config(tmp_path, save_every_steps=0)
  handler = signal.getsignal(signal.SIGINT)
  with pytest.raises(stop_signals.StoppedBySignal) as raised:
    run_tiny(config, [SendSigint(epoch=1, step=1)])
  assert raised.value.exit_code == 130
  state = checkpoints.read_state(str(tmp_path))
  assert (state.epoch, state.step) == (1, 1)
  assert str(raised.value).startswith(
      "stopped by SIGINT; checkpoint saved at epoch 2/3, step 1 in ")
  assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_ctrl_c_twice_stops_at_once_keeping_the_last_checkpoint(tmp_path):
  config = tiny_config(tmp_path, save_every_steps=0)
  with pytest.raises(KeyboardInterrupt):
    run_tiny(config, [SendSigint(epoch=1, step=1, times=2)])
  state = checkpoints.read_state(str(tmp_path))
  assert (state.epoch, state.step) == (1, 0)  # the end of epoch 1
  assert not [name for name in os.listdir(tmp_path / "checkpoints")
              if name.startswith(".tmp-")]


def test_ignored_sigint_stays_ignored(tmp_path):
  # How a shell starts a job in the background: Ctrl-C is not for it.
  config = tiny_config(tmp_path, save_every_steps=0)
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    _, callback = run_tiny(config, [SendSigint(epoch=1, step=1)])
  finally:
    signal.signal(signal.SIGINT, previous)
  assert [len(r["history"]["loss"]) for r in callback.stage_reports()] == [
      1, 2]


def test_a_run_keeps_its_id_across_resumptions_and_fresh_starts_anew(
    tmp_path):
  """The id the export records: a rerun after a kill must find the version
  it exported, and a new run must not take another run's version."""
  config = tiny_config(tmp_path, save_every_steps=0)
  with pytest.raises(RuntimeError, match="simulated crash"):
    run_tiny(config, [CrashAt(epoch=1, step=2)])
  run_id = checkpoints.read_run_id(str(tmp_path))
  assert run_id
  # Resumed and completed: every later checkpoint carries the same id.
  with pytest.raises(RuntimeError, match="after the last epoch"):
    run_tiny(config, [CrashAtEnd()], resume=workdir_lib.check_workdir(config))
  assert checkpoints.read_state(str(tmp_path)).epoch == 3
  assert checkpoints.read_run_id(str(tmp_path)) == run_id
  # A new run in the same workdir.
  fresh = tiny_config(tmp_path, save_every_steps=0, fresh=True)
  assert workdir_lib.prepare_workdir(fresh) is None
  assert checkpoints.read_run_id(str(tmp_path)) is None
  with pytest.raises(RuntimeError, match="simulated crash"):
    run_tiny(fresh, [CrashAt(epoch=1, step=2)])
  assert checkpoints.read_run_id(str(tmp_path)) not in (None, run_id)


def test_refusal_names_each_changed_flag():
  stored = {"image_size": 32, "seed": 1, "dropout": 0.2, "removed": 1}
  current = {"image_size": 48, "seed": 1, "dropout": 0.5, "added": 2}
  assert config_lib.changed_flags(stored, current) == [
      "--dropout was 0.2, now 0.5", "--image_size was 32, now 48"]
  with pytest.raises(config_lib.UserError) as raised:
    config_lib.refuse_changed_flags(stored, current, holder="W holds X",
                                    remedy="Pass --fresh.")
  assert str(raised.value) == ("W holds X (--dropout was 0.2, now 0.5; "
                               "--image_size was 32, now 48). Pass --fresh.")
  config_lib.refuse_changed_flags(stored, {"seed": 1}, "W", "R")  # no change


def test_a_setting_the_stored_fingerprint_lacks_counts_as_its_default():
  # Checkpoints or a search of a version before --label_smoothing existed.
  stored = {"seed": 1}
  default = config_lib.Config(workdir="w").label_smoothing
  assert config_lib.changed_flags(
      stored, {"seed": 1, "label_smoothing": default}) == []
  assert config_lib.changed_flags(
      stored, {"seed": 1, "label_smoothing": default / 2}) == [
          f"--label_smoothing was {default!r}, now {default / 2!r}"]


# ------------------------------------------------------- crash mid-write

# Each script kills its own process with SIGKILL halfway through a write:
# no `except`, no `finally`, no Python clean-up runs, as in a real crash.
REPORT_CRASH = textwrap.dedent("""
    import os, signal, sys
    from tf_finetune import report

    def dies(handle):  # the new report is written, not yet on disk or renamed
      os.kill(os.getpid(), signal.SIGKILL)

    os.fsync = dies
    report.write_report(os.path.dirname(sys.argv[1]),
                        {"stages": ["x" * 100] * 2000})
""")
MODEL_CRASH = textwrap.dedent("""
    import os, signal, sys
    import keras
    from tf_finetune import saved_models

    class DiesMidway(keras.layers.Layer):  # saved after the Dense layer
      def call(self, x):
        return x

      def save_own_variables(self, store):
        os.kill(os.getpid(), signal.SIGKILL)

    inputs = keras.Input((4,))
    outputs = DiesMidway()(keras.layers.Dense(256)(inputs))
    saved_models.save_model_atomic(keras.Model(inputs, outputs), sys.argv[1])
""")


def crash_while_writing(script, path):
  result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  # The crash did happen mid-write: a partial temp file is left beside it.
  partial = [p for p in os.listdir(os.path.dirname(path))
             if p.startswith(".tmp-")]
  assert partial and all(
      os.path.getsize(os.path.join(os.path.dirname(path), p)) > 0
      for p in partial)


@pytest.mark.slow
def test_crash_while_writing_report_json_keeps_the_previous_one(tmp_path):
  path = tmp_path / "report.json"
  report.write_report(str(tmp_path), {"class_names": ["a", "b"]})
  crash_while_writing(REPORT_CRASH, path)
  with open(path) as f:
    assert json.load(f) == {"class_names": ["a", "b"]}


@pytest.mark.slow
def test_crash_while_writing_model_keras_keeps_the_previous_one(tmp_path):
  path = tmp_path / "model.keras"
  inputs = keras.Input((4,))
  previous = keras.Model(inputs, keras.layers.Dense(2)(inputs))
  saved_models.save_model_atomic(previous, str(path))
  with open(path, "rb") as f:
    before = f.read()
  crash_while_writing(MODEL_CRASH, path)
  with open(path, "rb") as f:
    assert f.read() == before
  loaded = saved_models.load_model_safely(str(path))
  np.testing.assert_array_equal(loaded.layers[-1].kernel.numpy(),
                                previous.layers[-1].kernel.numpy())


# ------------------------------------------------------------ unsafe input


def test_keras_file_with_a_lambda_layer_is_refused(tmp_path):
  inputs = keras.Input((4,))
  outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
  keras.Model(inputs, outputs).save(str(tmp_path / "model.keras"))
  with open(tmp_path / "report.json", "w") as f:
    json.dump({"class_names": ["a", "b", "c", "d"]}, f)
  config = config_lib.Config(workdir=str(tmp_path), mode="export").validate()
  with pytest.raises(config_lib.UserError) as raised:
    export.run_export(config)
  message = str(raised.value)
  assert str(tmp_path / "model.keras") in message
  assert "Lambda" in message and "safe_mode" in message
  assert not os.path.exists(tmp_path / "export")


def test_weights_flag_takes_weight_files_only(tmp_path):
  # A whole model, even one that loads fine, is not a --weights file.
  inputs = keras.Input((4,))
  keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(
      str(tmp_path / "m.keras"))
  with pytest.raises(config_lib.UserError, match="only weight files"):
    config_lib.Config(workdir=str(tmp_path),
                      weights=str(tmp_path / "m.keras")).validate()


# --------------------------------------------- the command line, killed

SIZE = 32
HEAD_EPOCHS, FINETUNE_EPOCHS, UNFREEZE = 2, 2, 1
TOTAL = HEAD_EPOCHS + FINETUNE_EPOCHS


def start_cli(*flags):
  # SIGINT as in a terminal's foreground job, whatever the test runner got.
  return subprocess.Popen(
      [sys.executable, "-m", "tf_finetune.main", *flags], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def poll_state(workdir, process, condition, timeout=900):
  """Waits until the checkpoint pointer satisfies `condition`."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert process.poll() is None, process.communicate()[1][-3000:]
    state = checkpoints.read_state(workdir)
    if state is not None and condition(state):
      return state
    time.sleep(0.05)
  process.kill()
  raise AssertionError("timed out waiting for a checkpoint")


def progress(state):
  """(epoch, step): later checkpoints compare greater."""
  return state.epoch, state.step


def finish(process, timeout=900):
  out, err = process.communicate(timeout=timeout)
  return process.returncode, out, err


def backbone_values(backbone):
  return {v.path: v.numpy().copy() for v in backbone.weights}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  """A local backbone file with non-trivial BatchNorm statistics."""
  path = tmp_path_factory.mktemp("weights") / "resnet50.weights.h5"
  return str(path), write_backbone_weights(path, SIZE, seed=1)


def write_images(root):
  """train/ and val/ folders: 18 training images, 3 steps of 6 an epoch."""
  rng = np.random.default_rng(0)
  for split, count in (("train", 9), ("val", 3)):
    for label, name in enumerate(("dark", "light")):
      folder = os.path.join(root, split, name)
      os.makedirs(folder)
      for i in range(count):
        base = 60 + 120 * label
        pixels = rng.integers(base - 50, base + 50, (40, 40, 3))
        Image.fromarray(pixels.astype(np.uint8)).save(
            os.path.join(folder, f"{i}.png"))


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, weights_file):
  """One run stopped four ways, then completed:

  1. SIGTERM during stage "head", after its first checkpoint;
  2. the same command resumes, and gets SIGINT (Ctrl-C) after its first
     checkpoint;
  3. the same command resumes, and gets SIGKILL during stage "finetune";
  4. the same command with another --image_size is refused;
  5. the same command resumes and completes.
  """
  base = tmp_path_factory.mktemp("killed")
  workdir, images = str(base / "work"), str(base / "images")
  write_images(images)
  command = ("--flagfile=configs/smoke.cfg", f"--workdir={workdir}",
             f"--dataset=folder:{images}", f"--weights={weights_file[0]}",
             f"--image_size={SIZE}", "--batch_size=6", "--test_fraction=0",
             f"--head_epochs={HEAD_EPOCHS}",
             f"--finetune_epochs={FINETUNE_EPOCHS}",
             f"--unfreeze_blocks={UNFREEZE}", "--save_every_steps=1")
  runs = {}

  process = start_cli(*command)
  poll_state(workdir, process, lambda s: True)
  process.send_signal(signal.SIGTERM)
  runs["sigterm"] = finish(process)
  runs["after_sigterm"] = checkpoints.read_state(workdir)

  process = start_cli(*command)
  poll_state(workdir, process, lambda s: progress(s) > progress(
      runs["after_sigterm"]))
  process.send_signal(signal.SIGINT)
  runs["sigint"] = finish(process)
  runs["after_sigint"] = checkpoints.read_state(workdir)

  process = start_cli(*command)
  runs["in_finetune"] = poll_state(
      workdir, process, lambda s: s.stage == "finetune"
      and progress(s) > progress(runs["after_sigint"]))
  process.kill()  # SIGKILL
  runs["sigkill"] = finish(process)
  runs["after_sigkill"] = checkpoints.read_state(workdir)
  runs["report_after_sigkill"] = os.path.exists(
      os.path.join(workdir, "report.json"))

  with open(os.path.join(workdir, "flags.cfg")) as f:
    flags_before = f.read()
  result = subprocess.run(
      [sys.executable, "-m", "tf_finetune.main", *command, "--image_size=48"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  with open(os.path.join(workdir, "flags.cfg")) as f:
    runs["refused"] = (result.returncode, result.stderr,
                       f.read() == flags_before)

  runs["resumed"] = finish(start_cli(*command))
  return workdir, runs


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(killed_and_resumed):
  _, runs = killed_and_resumed
  code, _, err = runs["sigterm"]
  state = runs["after_sigterm"]
  assert code == 143, err[-3000:]
  assert "Traceback" not in err
  position = checkpoints.describe_position(state.epoch, state.step, TOTAL)
  assert f"tf_finetune: stopped by SIGTERM; checkpoint saved {position}" in err
  assert state.stage == "head"
  # The next run resumed from exactly there.
  _, _, err = runs["sigint"]
  assert f"{position} (stage 'head')" in err


def test_sigint_saves_a_checkpoint_and_exits_with_130(killed_and_resumed):
  workdir, runs = killed_and_resumed
  code, _, err = runs["sigint"]
  state = runs["after_sigint"]
  assert code == 130, err[-3000:]
  assert "Traceback" not in err
  where = checkpoints.describe_position(state.epoch, state.step, TOTAL)
  lines = [line for line in err.splitlines() if line.startswith("tf_finetune")]
  assert lines == [f"tf_finetune: stopped by SIGINT; checkpoint saved {where} "
                   f"in {workdir}/checkpoints. Rerun the same command "
                   "to resume."]
  assert progress(state) > progress(runs["after_sigterm"])
  # The next run resumed from exactly there.
  _, _, err = runs["sigkill"]
  assert f"{where} (stage '{state.stage}')" in err


def test_sigkill_in_finetune_then_rerun_completes_every_epoch(
    killed_and_resumed):
  workdir, runs = killed_and_resumed
  assert runs["sigkill"][0] == -signal.SIGKILL
  killed_at = runs["after_sigkill"]
  assert killed_at.stage == "finetune" and killed_at.epoch < TOTAL
  assert not runs["report_after_sigkill"]
  code, out, err = runs["resumed"]
  assert code == 0, err[-3000:]
  position = checkpoints.describe_position(killed_at.epoch, killed_at.step,
                                           TOTAL)
  assert f"{position} (stage 'finetune')" in err
  # Only the remaining epochs ran: not the head stage's again.
  for epoch in range(1, HEAD_EPOCHS + 1):
    assert f"Epoch {epoch}/{TOTAL}" not in out
  assert f"Epoch {TOTAL}/{TOTAL}" in out
  with open(os.path.join(workdir, "logs", "training.csv")) as f:
    rows = f.read().split()[1:]
  assert [int(row.split(",")[0]) for row in rows] == list(range(TOTAL))
  # A finished run leaves no checkpoints: rerunning starts over.
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_resumed_report_describes_both_stages(killed_and_resumed):
  workdir, runs = killed_and_resumed
  with open(os.path.join(workdir, "report.json")) as f:
    result = json.load(f)
  head, finetune = result["stages"]
  assert (head["name"], finetune["name"]) == ("head", "finetune")
  assert len(head["history"]["loss"]) == HEAD_EPOCHS
  assert len(finetune["history"]["loss"]) == FINETUNE_EPOCHS
  # Cosine decay from 1e-4 over the stage, continued across the kill: half
  # way at the end of its first epoch, zero at its end.
  assert finetune["history"]["learning_rate"] == pytest.approx(
      [5e-5, 0.0], abs=1e-9)
  assert finetune["trainable_params"] > head["trainable_params"]
  # Each resumption, in the stage it resumed in.
  resumed = [{"epoch": runs[name].epoch, "step": runs[name].step}
             for name in ("after_sigterm", "after_sigint", "after_sigkill")]
  assert head.get("resumed_at", []) + finetune["resumed_at"] == resumed
  assert head["resumed_at"][0] == resumed[0]


def test_frozen_layers_are_bit_identical_to_the_loaded_weights(
    killed_and_resumed, weights_file):
  workdir, _ = killed_and_resumed
  _, loaded = weights_file
  model = saved_models.load_trained_model(workdir)
  final = backbone_values(model.get_layer("backbone"))
  assert final.keys() == loaded.keys()
  changed = {k for k in loaded if not np.array_equal(loaded[k], final[k])}
  top = config_lib.RESNET50_BLOCKS[-UNFREEZE:]
  trainable = {k for k in loaded if stages.block_of(k.split("/")[0]) in top
               and "_conv/" in k}
  # The kept epoch decides: a finetune epoch changed exactly the unfrozen
  # convolutions; a head epoch (stage head beat every finetune epoch on
  # validation) left the whole backbone as loaded.
  with open(os.path.join(workdir, "report.json")) as f:
    kept_stage = json.load(f)["kept"]["stage"]
  assert trainable
  assert changed == (trainable if kept_stage == stages.FINETUNE else set())


def test_workdir_with_other_run_checkpoints_is_refused(killed_and_resumed):
  _, runs = killed_and_resumed
  code, err, flags_kept = runs["refused"]
  assert code == 2, err[-3000:]
  assert "--image_size was 32, now 48" in err and "--fresh" in err
  assert "Traceback" not in err
  assert flags_kept  # flags.cfg of the run being protected is not replaced


def test_non_finite_weights_are_never_checkpointed(tmp_path):
  class PoisonAt(keras.callbacks.Callback):  # e.g. an overflow in an update
    def on_epoch_end(self, epoch, logs=None):
      if epoch == 1:
        kernel = self.model.get_layer("classifier").kernel
        kernel.assign(np.full(kernel.shape, np.inf, "float32"))

  config = tiny_config(tmp_path, save_every_steps=0)
  with pytest.raises(config_lib.TrainingDiverged) as raised:
    run_tiny(config, [PoisonAt()])
  assert ("(classifier/kernel) in stage 'finetune', after epoch 2/3. The last "
          "checkpoint, written before that (after epoch 1/3)") in str(
              raised.value)
  assert checkpoints.read_state(str(tmp_path)).epoch == 1


# ------------------------------------ a resumed run trains the same batches


@pytest.fixture(scope="module")
def stopped_and_straight(tmp_path_factory, weights_file):
  """The same flags (shuffling and augmentation on) run twice: once
  uninterrupted, once stopped by SIGINT mid-finetune and rerun."""
  base = tmp_path_factory.mktemp("same_batches")
  images = str(base / "images")
  write_images(images)

  def command(workdir):
    # 18 training images in batches of 4: 5 steps an epoch, the last of 2.
    return ("--flagfile=configs/smoke.cfg", f"--workdir={workdir}",
            f"--dataset=folder:{images}", f"--weights={weights_file[0]}",
            f"--image_size={SIZE}", "--batch_size=4", "--test_fraction=0",
            "--head_epochs=1", "--finetune_epochs=2", "--unfreeze_blocks=1",
            "--augment=flip,rotation,contrast", "--save_every_steps=1")

  straight = str(base / "straight")
  code, _, err = finish(start_cli(*command(straight)))
  assert code == 0, err[-3000:]
  stopped = str(base / "stopped")
  process = start_cli(*command(stopped))
  poll_state(stopped, process,
             lambda s: s.stage == "finetune" and s.step >= 1)
  process.send_signal(signal.SIGINT)
  code, _, err = finish(process)
  assert code == 130, err[-3000:]
  state = checkpoints.read_state(stopped)
  code, _, err = finish(start_cli(*command(stopped)))
  assert code == 0, err[-3000:]
  return straight, stopped, state, err


def test_a_run_stopped_mid_epoch_ends_bit_identical_to_an_uninterrupted_one(
    stopped_and_straight):
  straight, stopped, state, err = stopped_and_straight
  assert state.stage == "finetune" and state.step > 0  # mid-epoch
  position = checkpoints.describe_position(state.epoch, state.step, 3)
  assert f"{position} (stage 'finetune')" in err
  expected = saved_models.load_trained_model(straight).weights
  actual = saved_models.load_trained_model(stopped).weights
  assert [v.path for v in actual] == [v.path for v in expected]
  for resumed, uninterrupted in zip(actual, expected):
    np.testing.assert_array_equal(resumed.numpy(), uninterrupted.numpy(),
                                  err_msg=resumed.path)

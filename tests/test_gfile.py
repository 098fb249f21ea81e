"""A workdir on a non-local file system: train, resume, export, evaluate and
predict with `--workdir=ram://...`, TensorFlow's in-memory file system
standing in for gs:// and the other `tf.io.gfile` stores.

ram:// lives inside one process, so everything runs in-process, in one
module-scoped fixture (it trains a ResNet50 twice).
"""

import os
import uuid

import keras
import pytest

from conftest import write_backbone_weights
from tf_finetune import checkpoints, config as config_lib, demo_data, evaluate
from tf_finetune import export, files, main, saved_models
from tf_finetune import model as model_lib, predict, train

# Trains a ResNet50: the tests using it are `slow` (conftest.py).
SLOW_FIXTURES = ("ram_run",)

# configs/smoke.cfg, with the flags this test is about.
SMOKE = dict(dataset="demo", weights="none", image_size=32, batch_size=16,
             head_epochs=1, finetune_epochs=1, finetune_min_steps=0,
             unfreeze_blocks=1,
             finetune_learning_rate=1e-4, augment=("flip",),
             test_fraction=0.1)


class StopAfterCheckpoint(keras.callbacks.Callback):
  """Stops the run at the second batch of stage finetune's epoch, after
  the checkpoint `--save_every_steps=1` wrote at the first."""

  def __init__(self, epoch):
    super().__init__()
    self.epoch, self.current = epoch, None

  def on_epoch_begin(self, epoch, logs=None):
    self.current = epoch

  def on_train_batch_begin(self, batch, logs=None):
    if self.current == self.epoch and batch == 1:
      raise RuntimeError("stopped after a checkpoint")


class EpochsTrained(keras.callbacks.Callback):
  """Records the epochs in which at least one batch was trained."""

  def __init__(self):
    super().__init__()
    self.epochs, self.current = set(), None

  def on_epoch_begin(self, epoch, logs=None):
    self.current = epoch

  def on_train_batch_end(self, batch, logs=None):
    self.epochs.add(self.current)


@pytest.fixture(scope="module")
def ram_run(tmp_path_factory):
  """Trains (stopped once, then resumed), evaluates, predicts and
  re-exports with a ram:// workdir, from a fresh local working folder.

  Returns:
    dict: workdir, cwd (the local working folder), report, the checkpoint
    state seen after the stop, the epochs the resumed run trained,
    evaluation, predictions, and the version `--mode=export` wrote.
  """
  base = tmp_path_factory.mktemp("gfile")
  cwd, data_dir = base / "cwd", str(base / "data")
  cwd.mkdir()
  workdir = f"ram://tf-finetune-{uuid.uuid4().hex[:8]}/run"
  # cache_memory_mb=0 sends the feature cache to WORKDIR/feature_cache/.
  config = config_lib.Config(workdir=workdir, data_dir=data_dir,
                             save_every_steps=1, cache_memory_mb=0,
                             **SMOKE).validate()
  previous = os.getcwd()
  os.chdir(cwd)  # A relative "ram:/..." folder would appear here.
  try:
    main.claim_workdir(config)
    with pytest.raises(RuntimeError, match="stopped after a checkpoint"):
      train.run_training(config, [StopAfterCheckpoint(epoch=1)])
    stopped = checkpoints.read_state(workdir)
    main.claim_workdir(config)  # The same run: resumes.
    trained = EpochsTrained()
    report = train.run_training(config, [trained])
    evaluation = evaluate.run_evaluation(
        config_lib.Config(workdir=workdir, data_dir=data_dir, mode="evaluate",
                          **SMOKE).validate())
    predictions = predict.run_prediction(
        config_lib.Config(workdir=workdir, mode="predict",
                          inputs=os.path.join(data_dir, demo_data.DEMO_VERSION),
                          **SMOKE).validate())
    exported = export.run_export(
        config_lib.Config(workdir=workdir, mode="export", **SMOKE).validate())
  finally:
    os.chdir(previous)
  yield dict(workdir=workdir, cwd=cwd, report=report, stopped=stopped,
             trained=trained.epochs, evaluation=evaluation,
             predictions=predictions, exported=exported)
  files.remove_tree(workdir.rsplit("/", 1)[0])


def test_outputs_are_on_the_workdirs_file_system(ram_run):
  workdir = ram_run["workdir"]
  for name in ("flags.cfg", "report.json", "model.keras",
               "export/1/saved_model.pb",
               "evaluation.json", "predictions.json", "curves.png",
               "logs/training.csv"):
    assert files.isfile(f"{workdir}/{name}"), name
  assert files.read_json(f"{workdir}/report.json")["export_path"] == (
      f"{workdir}/export/1")
  assert ram_run["report"]["export_path"] == f"{workdir}/export/1"
  assert ram_run["exported"] == f"{workdir}/export/2"
  assert files.isfile(f"{workdir}/export/2/saved_model.pb")


def test_nothing_is_written_to_a_local_folder_named_like_the_workdir(ram_run):
  assert os.listdir(ram_run["cwd"]) == []


def test_a_stopped_run_resumes_from_its_checkpoint_on_ram(ram_run):
  stopped = ram_run["stopped"]
  assert stopped is not None and stopped.epoch == 1
  # Resumed: stage head (epoch 0) is not trained again.
  assert ram_run["trained"] == {1}
  # The run finished: its checkpoints are gone.
  assert checkpoints.read_state(ram_run["workdir"]) is None
  # One row per epoch: the rows logged after the checkpoint were trimmed.
  log = files.read_text(f"{ram_run['workdir']}/logs/training.csv")
  lines = log.splitlines()
  assert [line.split(",")[0] for line in lines[1:]] == ["0", "1"]


def test_the_feature_cache_spilled_to_the_workdir(ram_run):
  head = ram_run["report"]["stages"][0]
  assert head["feature_cache"]["disk_mb"] > 0
  assert not files.exists(f"{ram_run['workdir']}/feature_cache")


def test_evaluation_and_predictions_read_the_ram_workdir(ram_run):
  assert sorted(ram_run["evaluation"]["per_class"]) == sorted(
      ram_run["report"]["class_names"])
  assert files.isfile(f"{ram_run['workdir']}/confusion_matrix.png")
  assert ram_run["predictions"]["predictions"]
  assert ram_run["predictions"]["export_path"] == (
      f"{ram_run['workdir']}/export/1")


@pytest.mark.slow
def test_backbone_weights_load_from_ram(tmp_path):
  local = tmp_path / "backbone.weights.h5"
  expected = write_backbone_weights(local, image_size=32, seed=5)
  path = f"ram://tf-finetune-{uuid.uuid4().hex[:8]}/backbone.weights.h5"
  files.write_bytes_atomic(path, local.read_bytes())
  local.unlink()
  try:
    model = model_lib.build_model(num_classes=2, image_size=32, weights=path)
  finally:
    files.remove(path)
  backbone = model_lib.get_backbone(model)
  for variable in backbone.weights:
    assert (variable.numpy() == expected[variable.path]).all(), variable.path


def test_missing_files_on_ram_are_user_errors():
  workdir = f"ram://tf-finetune-{uuid.uuid4().hex[:8]}/empty"
  files.makedirs(workdir)
  try:
    with pytest.raises(config_lib.UserError, match="no model.keras there"):
      saved_models.load_trained_model(workdir)
    with pytest.raises(config_lib.UserError, match="no report.json"):
      saved_models.read_class_names(workdir)
    with pytest.raises(config_lib.UserError, match="no such file"):
      model_lib.load_backbone_weights(None, f"{workdir}/x.weights.h5")
    files.write_json_atomic(f"{workdir}/checkpoints/checkpoint.json", {})
    with pytest.raises(config_lib.UserError, match="checkpoint"):
      main.claim_workdir(config_lib.Config(workdir=workdir, **SMOKE).validate())
    assert not files.exists(f"{workdir}/flags.cfg")
  finally:
    files.remove_tree(workdir.rsplit("/", 1)[0])

"""`--mode=tune`: KerasTuner searches end to end on tiny data.

The searches of the real HyperModel (ResNet50, weights=none, 32 px, six
images per class, one epoch per stage, unfreeze depth 0-1 so that the
trainable step traces fast) run once each and many assertions share them.
Resume, overwrite, executions, early stopping and the distributed search
use a tiny stand-in for `model.build_model` (`tiny_build`) to stay cheap.
"""

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time

import keras
import keras_tuner as kt
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_finetune import config as config_lib
from tf_finetune import features, files
from tf_finetune import model as model_lib
from tf_finetune import tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE = {"unfreeze_blocks": (0, 1), "finetune_learning_rate": (1e-4, 1e-2)}
SPACE_FLAGS = ("--search_unfreeze_blocks=0:1",
               "--search_finetune_learning_rate=1e-4:1e-2")
BUILT_SEEDS = []  # Seeds `tiny_build` was called with, in order.
# A search through the command line: the tests using it are `slow`
# (conftest.py).
SLOW_FIXTURES = {"random_search"}


def tiny_build(num_classes, image_size, weights, dropout, seed):
  """`model.build_model`'s interface and layer names, 300 parameters."""
  del weights
  BUILT_SEEDS.append(seed)
  print(f"tiny_build: {tf.distribute.get_strategy().num_replicas_in_sync} "
        "replica(s)", flush=True)
  images = keras.Input((image_size, image_size, 3))
  features = keras.layers.Conv2D(
      4, 3, strides=4, name="conv5_block3_1_conv",
      kernel_initializer=keras.initializers.GlorotUniform(seed))(images)
  backbone = keras.Model(images, features, name=model_lib.BACKBONE_NAME)
  inputs = keras.Input((image_size, image_size, 3), dtype="uint8")
  x = backbone(model_lib.ImageNetPreprocess()(inputs))
  x = keras.layers.GlobalAveragePooling2D(name=model_lib.FEATURES_NAME)(x)
  x = keras.layers.Normalization(name=model_lib.STANDARDIZE_NAME)(x)
  x = keras.layers.Dropout(dropout, seed=seed)(x)
  outputs = keras.layers.Dense(num_classes, activation="softmax",
                               name=model_lib.CLASSIFIER_NAME)(x)
  return keras.Model(inputs, outputs)


def crashing_build(*args):
  """A `build_fn` whose every trial fails."""
  raise RuntimeError("out of memory, say")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """Three colour classes, six 32 px images each (four train, two val)."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for index, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
    folder = root / f"class{index}"
    folder.mkdir()
    for i in range(6):
      pixels = np.clip(rng.normal(colour, 40, (32, 32, 3)), 0, 255)
      Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
  return str(root)


def data_flags(images, workdir):
  return ("--flagfile=configs/smoke.cfg", f"--workdir={workdir}",
          f"--dataset=folder:{images}", "--val_fraction=0.34",
          "--test_fraction=0", "--batch_size=8")


def make_config(images, workdir, **overrides):
  """The Config of `data_flags` plus a small search, for in-process runs."""
  values = dict(
      workdir=str(workdir), mode="tune", dataset=f"folder:{images}",
      image_size=32, batch_size=8, val_fraction=0.34, test_fraction=0.0,
      weights="none", head_epochs=1, finetune_epochs=1, finetune_min_steps=0,
      augment=("flip",),
      search_unfreeze_blocks="0:1", search_finetune_learning_rate="1e-4:1e-2",
      max_trials=2)
  values.update(overrides)
  return config_lib.Config(**values).validate()


def run_cli(*flags, timeout=900):
  return subprocess.run([sys.executable, "-m", "tf_finetune.main", *flags],
                        cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def read_json(path):
  with open(path) as f:
    return json.load(f)


def trial_status(path):
  try:
    return read_json(path)["status"]
  except (OSError, ValueError):  # Not written yet, or half written.
    return None


def assert_trials_inside_the_space(report, space=SPACE, count=2):
  trials = report["trials"]
  assert [t["trial_id"] for t in trials] == [str(i) for i in range(count)]
  assert all(t["status"] == "COMPLETED" for t in trials), trials
  values = [t["hyperparameters"] for t in trials]
  for trial_values in values:
    assert set(trial_values) == set(space)
    for name, (low, high) in space.items():
      assert low <= trial_values[name] <= high, (name, trial_values)
  assert len({json.dumps(v, sort_keys=True) for v in values}) == count
  # The best trial has the best score; on a tie (a handful of validation
  # images gives few distinct accuracies) either trial is the best.
  scores = {t["trial_id"]: t["score"] for t in trials}
  assert scores[report["best_trial"]] == max(scores.values())


# ------------------------------------------------- random search, via the CLI


@pytest.fixture(scope="module")
def random_search(images, tmp_path_factory):
  """A 2-trial random search, killed (SIGKILL) in its second trial and rerun
  with the same flags. Returns the workdir, the first trial's files as they
  were before the rerun, and the rerun's output."""
  workdir = str(tmp_path_factory.mktemp("random") / "work")
  # Seed 1: the two trials unfreeze 1 and 0 blocks.
  flags = (*data_flags(images, workdir), "--mode=tune", "--tuner=random",
           "--max_trials=2", "--seed=1", *SPACE_FLAGS)
  trial_file = os.path.join(workdir, "tuner", "trial_{}", "trial.json")
  log = workdir + ".log"
  with open(log, "w") as sink:
    first = subprocess.Popen(
        [sys.executable, "-m", "tf_finetune.main", *flags], cwd=ROOT,
        stdout=sink, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 600
    while not (os.path.isfile(trial_file.format(1))
               and trial_status(trial_file.format(0)) == "COMPLETED"):
      with open(log) as f:
        assert first.poll() is None, f.read()[-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.2)
  finally:
    first.kill()  # SIGKILL: no chance to save anything.
    first.wait()
  with open(trial_file.format(0), "rb") as f:
    first_trial = f.read()
  rerun = run_cli(*flags)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  return workdir, first_trial, rerun.stdout


def test_random_search_trials_differ_and_lie_inside_the_space(random_search):
  workdir, _, stdout = random_search
  report = read_json(os.path.join(workdir, "tuning_report.json"))
  assert_trials_inside_the_space(report)
  for trial in report["trials"]:
    assert trial["epochs"] == {"budget": 2, "run": 2, "head": 1, "finetune": 1}
    assert trial["seconds"] > 0
    assert trial["score"] == trial["metrics"]["val_accuracy"]
  # The summary table: a header and one row per trial, the best marked.
  assert "trial  status     unfreeze_blocks  finetune_learning_rate" in stdout
  assert re.search(rf"^\*{report['best_trial']} +COMPLETED", stdout, re.M)


def test_resumed_search_does_not_redo_finished_trials(random_search):
  workdir, first_trial, stdout = random_search
  assert ("resuming the search: 1 finished trial(s) kept, 1 interrupted "
          "one(s) to run again") in stdout
  assert "trial 1 on tuner0" in stdout
  assert "trial 0 on tuner0" not in stdout
  with open(os.path.join(workdir, "tuner", "trial_0", "trial.json"), "rb") as f:
    assert f.read() == first_trial


def test_best_cfg_trains_the_best_trial(random_search):
  workdir, _, _ = random_search
  report = read_json(os.path.join(workdir, "tuning_report.json"))
  best = next(t for t in report["trials"]
              if t["trial_id"] == report["best_trial"])
  # best.cfg alone: no other flag on the command line.
  trained = run_cli(f"--flagfile={workdir}/best.cfg")
  assert trained.returncode == 0, trained.stderr[-3000:]
  run = read_json(os.path.join(workdir, "report.json"))
  head, finetune = run["stages"]
  assert run["config"]["mode"] == "train"
  assert finetune["learning_rate"] == best["hyperparameters"][
      "finetune_learning_rate"]
  assert len(finetune["unfrozen_blocks"]) == best["hyperparameters"][
      "unfreeze_blocks"]
  assert head["learning_rate"] == 1e-3  # Not searched: the training flag.
  # Same seed, same data, same stages: the run reproduces the trial.
  assert run["val_accuracy"] == pytest.approx(best["score"], abs=1e-6)
  # The trial's metrics are those of the epoch it kept, as the run's are.
  assert run["kept"]["val_loss"] == pytest.approx(
      best["metrics"]["val_loss"], rel=1e-3)


def test_changed_search_space_is_refused(random_search, images):
  workdir, _, _ = random_search
  definition = os.path.join(workdir, "tuner", "search.json")
  before = read_json(definition)
  result = run_cli(*data_flags(images, workdir), "--mode=tune",
                   "--max_trials=2", "--search_unfreeze_blocks=0:2",
                   "--search_finetune_learning_rate=1e-4:1e-2", timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "--search_unfreeze_blocks was '0:1', now '0:2'" in result.stderr
  assert "--overwrite_search" in result.stderr
  assert "Traceback" not in result.stderr
  assert read_json(definition) == before


# ------------------------------------------- the other tuners, in process


@pytest.mark.slow
def test_hyperband_honours_budgets_across_both_stages(images, tmp_path):
  # The most aggressive bracket of max_epochs=6, factor 3 gives 2 epochs:
  # with stage head 3 epochs and finetune 3, one epoch each.
  config = make_config(images, tmp_path, tuner="hyperband", head_epochs=3,
                       finetune_epochs=3, max_epochs=6, hyperband_factor=3)
  report = tuning.run_search(config)
  assert_trials_inside_the_space(report)
  for trial in report["trials"]:
    assert trial["epochs"] == {"budget": 2, "run": 2, "head": 1, "finetune": 1}
  assert os.path.isfile(os.path.join(tmp_path, "best.cfg"))


@pytest.mark.slow
def test_bayesian_search_runs(images, tmp_path):
  pytest.importorskip("scipy", reason="keras-tuner[bayesian] not installed")
  pytest.importorskip("sklearn", reason="keras-tuner[bayesian] not installed")
  report = tuning.run_search(make_config(images, tmp_path, tuner="bayesian"))
  assert_trials_inside_the_space(report)


# --------------------------------------------- tiny model: cheap semantics


def test_overwrite_semantics(images, tmp_path):
  config = make_config(images, tmp_path)
  first = tuning.run_search(config, build_fn=tiny_build)
  changed = dataclasses.replace(config, search_dropout="0.1:0.5")
  with pytest.raises(config_lib.UserError, match="--search_dropout was '', "
                     "now '0.1:0.5'.*--overwrite_search"):
    tuning.run_search(changed, build_fn=tiny_build)
  # More trials is no change of the search: it resumes.
  more = tuning.run_search(dataclasses.replace(config, max_trials=3),
                           build_fn=tiny_build)
  assert more["trials"][:2] == first["trials"]
  assert len(more["trials"]) == 3
  fresh = tuning.run_search(
      dataclasses.replace(changed, overwrite_search=True, max_trials=1),
      build_fn=tiny_build)
  assert len(fresh["trials"]) == 1
  assert 0.1 <= fresh["trials"][0]["hyperparameters"]["dropout"] <= 0.5
  assert not os.path.exists(os.path.join(tmp_path, "tuner", "trial_1"))


def test_each_execution_starts_from_another_initialisation(images, tmp_path):
  BUILT_SEEDS.clear()
  report = tuning.run_search(
      make_config(images, tmp_path, max_trials=1, executions_per_trial=2,
                  seed=7), build_fn=tiny_build)
  assert BUILT_SEEDS == [7, 8]
  logs = os.path.join(tmp_path, "tuner", "logs", "0")
  assert sorted(os.listdir(logs)) == ["execution0", "execution1"]
  assert report["trials"][0]["epochs"]["run"] == 2


def test_early_stopping_watches_stage_finetune_only(images, tmp_path):
  # Learning rates so small that val_accuracy never improves: patience 1
  # stops after the second finetune epoch, never in stage head.
  config = make_config(images, tmp_path, max_trials=1, head_epochs=3,
                       finetune_epochs=4, head_learning_rate=1e-12,
                       search_finetune_learning_rate="1e-12:2e-12",
                       early_stopping_patience=1)
  report = tuning.run_search(config, build_fn=tiny_build)
  assert report["trials"][0]["epochs"] == {
      "budget": 7, "run": 5, "head": 3, "finetune": 2}


def test_bad_input_inside_a_trial_stops_the_search(images, tmp_path):
  calls = []

  def build_with_bad_weights(*args):
    calls.append(args)
    raise config_lib.UserError("--weights='x.weights.h5': no such file.")

  with pytest.raises(config_lib.UserError, match="--weights='x.weights.h5'"):
    tuning.run_search(make_config(images, tmp_path), build_with_bad_weights)
  assert len(calls) == 1  # Not once per trial: it would fail them all.


@pytest.mark.parametrize("max_trials, failed, message", [
    (2, 2, "No trial completed"),
    # KerasTuner stops the search after 3 failures in a row.
    (5, 3, "stopped after 3 failed trials in a row, the last with: "
     "RuntimeError: out of memory, say"),
])
def test_failed_trials_are_reported(images, tmp_path, max_trials, failed,
                                    message):
  with pytest.raises(config_lib.UserError, match=message):
    tuning.run_search(make_config(images, tmp_path, max_trials=max_trials),
                      crashing_build)
  report = read_json(os.path.join(tmp_path, "tuning_report.json"))
  assert [t["status"] for t in report["trials"]] == ["FAILED"] * failed
  assert report["trials"][0]["error"] == "RuntimeError: out of memory, say"
  assert not os.path.exists(os.path.join(tmp_path, "best.cfg"))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# One process of a distributed search: argv = Config as JSON, builder name.
_PROCESS = """
import json, sys
sys.path.insert(0, "tests")
import test_tuning
from tf_finetune import config, tuning
values, builder = json.loads(sys.argv[1]), getattr(test_tuning, sys.argv[2])
try:
  result = tuning.run_search(config.Config(**values).validate(), builder)
except config.UserError as e:
  sys.exit(f"error: {e}")
if result is not None:
  print(tuning.format_summary(result))
"""


def run_distributed(config, tuner_ids, builder, folder):
  """Runs the chief and workers of one search; returns {id: (code, log)}."""
  values = json.dumps({**dataclasses.asdict(config),
                       "augment": list(config.augment)})
  env = {**os.environ, "KERASTUNER_ORACLE_IP": "127.0.0.1",
         "KERASTUNER_ORACLE_PORT": str(free_port())}
  processes = {}
  for tuner_id in tuner_ids:
    with open(folder / f"{tuner_id}.log", "w") as log:
      processes[tuner_id] = subprocess.Popen(
          [sys.executable, "-c", _PROCESS, values, builder], cwd=ROOT,
          stdout=log, stderr=subprocess.STDOUT,
          env={**env, "KERASTUNER_TUNER_ID": tuner_id})
  try:
    codes = {name: p.wait(timeout=300) for name, p in processes.items()}
  finally:
    for process in processes.values():
      process.kill()
  return {name: (codes[name], (folder / f"{name}.log").read_text())
          for name in tuner_ids}


@pytest.mark.slow
def test_distributed_search_records_every_trial_once(images, tmp_path):
  # Seed 3: the trials unfreeze 0, 1, 0, 1 blocks of the tiny backbone, and
  # the splits (14 train, 4 val) halve evenly for MirroredStrategy on two
  # CPU halves, under which each worker trains: a first validation batch
  # that does not halve evenly fails in Keras (keras-team/keras#19246).
  config = make_config(images, tmp_path / "work", max_trials=4, seed=3,
                       val_fraction=0.25, strategy="mirrored",
                       virtual_cpu_devices=2)
  results = run_distributed(config, ("chief", "tuner0", "tuner1"),
                            "tiny_build", tmp_path)
  logs = {name: log for name, (_, log) in results.items()}
  assert {name: code for name, (code, _) in results.items()} == {
      "chief": 0, "tuner0": 0, "tuner1": 0}, logs
  report = read_json(os.path.join(config.workdir, "tuning_report.json"))
  assert_trials_inside_the_space(report, count=4)
  ran = [line.split()[2] for name in ("tuner0", "tuner1")
         for line in logs[name].splitlines()
         if line.startswith("tf_finetune: trial ")]
  assert sorted(ran) == ["0", "1", "2", "3"]  # Each trial ran once.
  for name in ("tuner0", "tuner1"):
    builds = logs[name].count("tiny_build: ")
    assert logs[name].count("tiny_build: 2 replica(s)") == builds
  assert "trial 0 on" not in logs["chief"]  # The chief only hands them out.


@pytest.mark.slow
def test_distributed_search_of_failing_trials_ends(images, tmp_path):
  # KerasTuner alone would stop after 3 failures inside a gRPC call, kill
  # the worker and leave the chief waiting forever.
  config = make_config(images, tmp_path / "work", max_trials=4)
  results = run_distributed(config, ("chief", "tuner0"), "crashing_build",
                            tmp_path)
  chief_code, chief_log = results["chief"]
  assert results["tuner0"][0] == 0, results["tuner0"][1]
  assert chief_code == 1 and "No trial completed" in chief_log, chief_log
  report = read_json(os.path.join(config.workdir, "tuning_report.json"))
  assert [t["status"] for t in report["trials"]] == ["FAILED"] * 4


# --------------------------------------------------------------- bad input


def test_split_budget_keeps_both_stages_and_the_total():
  assert tuning.split_budget(2, 3, 5) == (1, 1)
  assert tuning.split_budget(4, 3, 5) == (2, 2)
  assert tuning.split_budget(8, 3, 5) == (3, 5)
  assert tuning.split_budget(1, 3, 5) == (0, 1)
  for head in range(5):
    for finetune in range(5):
      for budget in range(1, head + finetune + 1):
        h, f = tuning.split_budget(budget, head, finetune)
        assert (h + f, h <= head, f <= finetune) == (budget, True, True)
        if budget >= 2 and head and finetune:
          assert h >= 1 and f >= 1


@pytest.mark.slow
@pytest.mark.parametrize("flags, culprit", [
    (["--search_unfreeze_blocks=3:1"], "MIN 3 is above MAX 1"),
    (["--search_unfreeze_blocks=0:17"], "both bounds must be 0 to 16"),
    (["--search_finetune_learning_rate=0:1e-3"], "must be above 0"),
    (["--search_dropout=0.5:1.5"], "--search_dropout='0.5:1.5'"),
    (["--search_head_learning_rate=fast"], "expected MIN:MAX"),
    (["--tuner=grid"], "--tuner=grid: value should be one of"),
    (["--max_trials=0"], "--max_trials=0: must be >= 1"),
    (["--max_epochs=3"], "--max_epochs=3"),
    (["--objective=f1"], "--objective=f1: value should be one of"),
])
def test_bad_search_flags_fail_fast_naming_the_flag(tmp_path, flags, culprit):
  result = run_cli("--flagfile=configs/smoke.cfg", f"--workdir={tmp_path}",
                   "--mode=tune", "--search_unfreeze_blocks=0:1", *flags,
                   timeout=60)
  assert result.returncode == 2, result.stderr[-2000:]
  assert culprit in result.stderr
  assert "Traceback" not in result.stderr


def test_default_search_space_is_valid(tmp_path):
  config = config_lib.Config(workdir=str(tmp_path), mode="tune").validate()
  ranges = config.search_ranges()
  assert set(ranges) == set(config_lib.DEFAULT_SEARCH)
  for name, (low, high) in ranges.items():
    in_bounds = config_lib.SEARCHABLE[name][2]
    assert low < high and in_bounds(low) and in_bounds(high), name
  # The defaults themselves lie inside the space they are searched in.
  for name, (low, high) in ranges.items():
    assert low <= getattr(config, name) <= high, name
  hp = kt.HyperParameters()
  tuning.FineTuneHyperModel(config).declare_hyperparameters(hp)
  assert {p.name for p in hp.space} == set(ranges)
  # best.cfg records no search flag, so it never restarts a search.
  assert tuning.shares_stage_head(config)


def _count_stage_head_trainings(monkeypatch):
  calls = []
  compute = features.CachedHeadStage._compute

  def counting(self):
    calls.append(1)
    compute(self)
  monkeypatch.setattr(features.CachedHeadStage, "_compute", counting)
  return calls


def test_trials_share_one_stage_head_trained_once(images, tmp_path,
                                                  monkeypatch):
  calls = _count_stage_head_trainings(monkeypatch)
  config = make_config(images, tmp_path, max_trials=3, head_epochs=2)
  report = tuning.run_search(config, build_fn=tiny_build)
  assert len(calls) == 1
  assert report["shared_stage_head"] is True and report["seconds"] > 0
  assert [t["head_shared"] for t in report["trials"]] == [False, True, True]
  # The first trial is the flags' own recipe (clipped into the space).
  assert report["trials"][0]["hyperparameters"] == {
      "unfreeze_blocks": 1, "finetune_learning_rate": 1e-4}
  # Every trial reports the same stage head and goes on from it.
  for trial in report["trials"]:
    assert trial["epochs"] == {"budget": 3, "run": 3, "head": 2,
                               "finetune": 1}


def test_a_searched_head_hyperparameter_trains_a_head_per_trial(
    images, tmp_path, monkeypatch):
  calls = _count_stage_head_trainings(monkeypatch)
  config = make_config(images, tmp_path, max_trials=2,
                       search_dropout="0.1:0.5")
  report = tuning.run_search(config, build_fn=tiny_build)
  assert len(calls) == 2 and report["shared_stage_head"] is False


def test_half_set_distribution_variables_are_an_error(monkeypatch):
  monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
  monkeypatch.delenv("KERASTUNER_ORACLE_PORT", raising=False)
  monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner0")
  with pytest.raises(config_lib.UserError, match="KERASTUNER_ORACLE_PORT"):
    tuning.distributed_role()


def test_bayesian_without_its_packages_is_an_error(monkeypatch):
  monkeypatch.setattr(tuning.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(config_lib.UserError, match="--tuner=bayesian"):
    tuning.check_tuner_available("bayesian")
  tuning.check_tuner_available("random")  # Needs neither.


# ------------------------------------------ a trial is a training run


@pytest.mark.slow
def test_a_trial_trains_exactly_what_mode_train_trains(images, tmp_path,
                                                      monkeypatch):
  """One trial and `--mode=train` with the same hyperparameters: the same
  setup path (train.set_up_run), so bit-identical final weights and the
  same resolved speed switches."""
  from tf_finetune import train
  final_weights = []
  fit_stages = train.fit_stages

  def recording(run, *args, **kwargs):
    history = fit_stages(run, *args, **kwargs)
    final_weights.append([v.numpy().copy() for v in run.model.weights])
    return history
  monkeypatch.setattr(train, "fit_stages", recording)
  search = make_config(images, tmp_path / "search", max_trials=1,
                       search_unfreeze_blocks="1:1",
                       search_finetune_learning_rate="1e-3:1e-3")
  tuning_report = tuning.run_search(search)
  training = dataclasses.replace(
      search, mode="train", workdir=str(tmp_path / "train"),
      unfreeze_blocks=1, finetune_learning_rate=1e-3,
      search_unfreeze_blocks="", search_finetune_learning_rate="")
  report = train.run_training(training)
  assert len(final_weights) == 2
  for trial, trained in zip(*final_weights):
    np.testing.assert_array_equal(trial, trained)
  speed = dict(report["speed"])
  speed.pop("peak_rss_mb")
  assert tuning_report["speed"] == speed
  assert tuning_report["trials"][0]["metrics"]["val_accuracy"] == (
      pytest.approx(report["val_accuracy"]))


def test_a_search_in_a_ram_workdir_keeps_its_files_there(images, tmp_path,
                                                        monkeypatch):
  # KerasTuner writes through tf.io.gfile, so a gs:// workdir works as
  # ram:// does here.
  monkeypatch.chdir(tmp_path)  # A relative "ram:/..." folder would appear here.
  workdir = f"ram://tune-{tmp_path.name}/work"
  config = make_config(images, workdir)
  result = tuning.run_search(config, build_fn=tiny_build)
  assert len(result["trials"]) == 2
  for name in ("tuning_report.json", "best.cfg", "tuner/search.json",
               "tuner/oracle.json"):
    assert files.isfile(f"{workdir}/{name}"), name
  with pytest.raises(config_lib.UserError, match="--overwrite_search"):
    tuning.run_search(dataclasses.replace(config, search_dropout="0.1:0.5"),
                      build_fn=tiny_build)
  assert os.listdir(tmp_path) == []
  files.remove_tree(workdir.rsplit("/", 1)[0])

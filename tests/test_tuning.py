"""`--mode=tune`: KerasTuner searches end to end on tiny data.

Every trial is a training run in a child process. The searches of the real
HyperModel (ResNet50, weights=none, 32 px, six images per class, one epoch
per stage, unfreeze depth 0-1 so that the trainable step traces fast) run
through the command line once and many assertions share them. The others
run their trials with `TRIAL_COMMAND`: the package's command line with a
tiny stand-in for `model.build_model` and the faults the environment asks
for (tests/tuning_stand_ins.py). Every trial costs a process start, so a
search that several tests only read is a module fixture.
"""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import keras
import keras_tuner as kt
import numpy as np
import pytest
from PIL import Image

from tf_finetune import config as config_lib
from tf_finetune import tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE = {"unfreeze_blocks": (0, 1), "finetune_learning_rate": (1e-4, 1e-2)}
SPACE_FLAGS = ("--search_unfreeze_blocks=0:1",
               "--search_finetune_learning_rate=1e-4:1e-2")
# Searches that several tests share: the tests using them are `slow`
# (conftest.py).
SLOW_FIXTURES = {"random_search", "bayesian_search",
                 "early_stopped_search"}
# A trial's process here: `python -m tf_finetune.main` with the stand-in
# model, and the faults of TEST_FAIL_TRIALS (the build raises), TEST_NAN_TRIALS
# (NaN weights in stage finetune), TEST_BUILD (another builder) and
# TEST_CRASH (every trial raises crashing_build's error as it starts). The
# search sees only a trial's exit code and last line, so TEST_CRASH fails a
# trial before its seconds of TensorFlow start-up, for the searches whose
# trials all fail. tuning_stand_ins imports neither tf_finetune.train nor
# tuning, so train, imported after the swap, builds with the stand-in.
TRIAL_COMMAND = (sys.executable, "-c", f"""
import os, sys
if os.environ.get("TEST_CRASH"):
  raise RuntimeError("out of memory, say")
sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
import tuning_stand_ins
from tf_finetune import model
model.build_model = tuning_stand_ins.child_build(sys.argv)
from tf_finetune import main, train
tuning_stand_ins.install_faults(train, sys.argv)
main.run()
""")


def tiny_search(config):
  """`tuning.run_search` with trials of the stand-in model."""
  return tuning.run_search(config, TRIAL_COMMAND)


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
  """The Config of `data_flags` plus a small search, for in-process runs.

  No linear probe: stage head trains by gradient steps alone, seconds less
  in every trial that trains one. The searches here pin what the tuner does
  with the trials; the probe has tests of its own (test_probe.py), and the
  command-line search (`random_search`) trials with it.
  """
  values = dict(
      workdir=str(workdir), mode="tune", dataset=f"folder:{images}",
      image_size=32, batch_size=8, val_fraction=0.34, test_fraction=0.0,
      weights="none", head_epochs=1, finetune_epochs=1, finetune_min_steps=0,
      probe_head=False, augment=("flip",),
      search_unfreeze_blocks="0:1", search_finetune_learning_rate="1e-4:1e-2",
      tuner="random", max_trials=2)
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
  # The search kept that very model, and exported it.
  assert_same_weights(os.path.join(workdir, "best", "model.keras"),
                      os.path.join(workdir, "model.keras"))
  assert report["best_export"] == os.path.join(workdir, "best", "export", "1")
  assert os.path.isfile(os.path.join(report["best_export"], "saved_model.pb"))


def assert_same_weights(kept, trained):
  kept, trained = (keras.models.load_model(path) for path in (kept, trained))
  for a, b in zip(kept.weights, trained.weights, strict=True):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


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


# ------------------------------- the other tuners, trials of the stand-in


@pytest.mark.slow
def test_hyperband_honours_budgets_across_both_stages(images, tmp_path):
  # The most aggressive bracket of max_epochs=6, factor 3 gives 2 epochs:
  # with stage head 3 epochs and finetune 3, one epoch each.
  config = make_config(images, tmp_path, tuner="hyperband", head_epochs=3,
                       finetune_epochs=3, max_epochs=6, hyperband_factor=3)
  report = tiny_search(config)
  assert_trials_inside_the_space(report)
  for trial in report["trials"]:
    assert trial["epochs"] == {"budget": 2, "run": 2, "head": 1, "finetune": 1}
  # best.cfg is the best trial's run, its budget included.
  best = read_json(os.path.join(tmp_path, "best", "report.json"))["config"]
  best_cfg = (tmp_path / "best.cfg").read_text()
  assert "\n--head_epochs=1\n" in best_cfg
  assert "\n--finetune_epochs=1\n" in best_cfg
  assert (best["head_epochs"], best["finetune_epochs"]) == (1, 1)


# ------------------------------------------- a trial is a training run


@pytest.fixture(scope="module")
def bayesian_search(images, tmp_path_factory):
  """A 3-trial Bayesian search of the stand-in whose trials share a stage
  head of 2 epochs. Returns its workdir (a pathlib.Path) and report.

  Sharing the head is the tuner's work, whichever oracle draws the trials,
  so one search serves the Bayesian oracle's test and the shared head's.
  --save_every_steps=1: every trial checkpoints at every step, in its own
  workdir only.
  """
  workdir = tmp_path_factory.mktemp("bayesian") / "search"
  report = tiny_search(make_config(images, workdir, tuner="bayesian",
                                   max_trials=3, head_epochs=2,
                                   save_every_steps=1))
  return workdir, report


def test_bayesian_search_runs(bayesian_search):
  workdir, report = bayesian_search
  assert read_json(workdir / "tuner" / "search.json")["tuner"] == "bayesian"
  assert_trials_inside_the_space(report, count=3)


def test_trials_share_a_stage_head_and_the_search_keeps_its_best_model(
    bayesian_search, tmp_path):
  search, report = bayesian_search
  assert report["shared_stage_head"] is True and report["seconds"] > 0
  assert [t["head_shared"] for t in report["trials"]] == [False, True, True]
  # The first trial is the flags' own recipe (clipped into the space).
  assert report["trials"][0]["hyperparameters"] == {
      "unfreeze_blocks": 1, "finetune_learning_rate": 1e-4}
  project = search / "tuner"
  for trial in report["trials"]:
    assert trial["epochs"] == {"budget": 3, "run": 3, "head": 2,
                               "finetune": 1}
    # A process of its own per trial, its peak memory recorded.
    assert 100 < trial["peak_rss_mb"] < 8000
    # The search process's own high-water mark, after each trial.
    assert 100 < trial["search_peak_rss_mb"] < 8000
    log = (project / "trials" / trial["trial_id"] / "trial.log").read_text()
    assert ("Starting stage finetune from the stage head" in log) == (
        trial["head_shared"])
  # The shared head is stage head's end, untouched by any finetune step.
  shared = read_json(project / "shared_heads" / "head2-execution0" /
                     "checkpoints" / "checkpoint.json")
  assert (shared["epoch"], shared["step"], shared["stage"]) == (2, 0, "head")
  # One model on disk: the best trial's, in best/; every trial's report.
  best = search / "best"
  assert report["best_workdir"] == str(best)
  assert sorted(os.listdir(best)) == ["curves.png", "export", "export.log",
                                      "flags.cfg", "model.keras",
                                      "report.json"]
  assert os.listdir(best / "export") == ["1"]
  for trial in report["trials"]:
    folder = project / "trials" / trial["trial_id"]
    assert not (folder / "model.keras").exists()
    assert read_json(folder / "report.json")["val_accuracy"] >= 0
    assert not (folder / "checkpoints").exists()
  # Training best.cfg (another workdir) gives the kept model.
  trained = subprocess.run(
      [*TRIAL_COMMAND, f"--flagfile={search}/best.cfg",
       f"--workdir={tmp_path}/trained"], capture_output=True, text=True,
      timeout=600)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert_same_weights(best / "model.keras", tmp_path / "trained/model.keras")


@pytest.mark.slow
def test_bad_trials_are_recorded_and_the_search_goes_on(images, tmp_path,
                                                        monkeypatch):
  # Trial 0 trains the shared head, then diverges in stage finetune;
  # trial 1 raises; trial 2 completes from trial 0's head.
  monkeypatch.setenv("TEST_NAN_TRIALS", "0")
  monkeypatch.setenv("TEST_FAIL_TRIALS", "1")
  report = tiny_search(make_config(images, tmp_path, max_trials=3))
  trials = report["trials"]
  assert [t["status"] for t in trials] == ["FAILED", "FAILED", "COMPLETED"]
  assert re.match(r"tf_finetune: error: (The training loss became nan|"
                  r"Weights became NaN)", trials[0]["error"]), trials[0]
  assert trials[1]["error"] == "RuntimeError: out of memory, say"
  assert trials[2]["head_shared"] is True
  assert report["best_trial"] == "2"
  # Each trial's peak memory, the failed ones' too.
  assert all(100 < t["peak_rss_mb"] < 8000 for t in trials), trials
  for trial in trials[:2]:
    assert not (tmp_path / "tuner" / "trials" / trial["trial_id"] /
                "checkpoints").exists()


@pytest.mark.slow
def test_a_killed_trial_is_recorded_with_its_signal(tmp_path):
  outcome = tuning.run_child(
      [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), "
       "signal.SIGKILL)"], str(tmp_path / "trial.log"))
  assert outcome.returncode == -9
  assert outcome.reason() == "killed by SIGKILL (out of memory?)"
  with pytest.raises(tuning.TrialFailed, match="killed by SIGKILL"):
    tuning.trial_results(None, outcome)


@pytest.mark.slow
def test_bad_input_inside_a_trial_stops_the_search(images, tmp_path,
                                                   monkeypatch):
  monkeypatch.setenv("TEST_BUILD", "user_error_build")
  with pytest.raises(config_lib.UserError) as raised:
    tiny_search(make_config(images, tmp_path))
  assert str(raised.value) == "--weights='x.weights.h5': no such file."
  # Not once per trial: it would fail them all.
  assert os.listdir(tmp_path / "tuner" / "trials") == ["0"]


@pytest.mark.slow
def test_a_search_of_failing_trials_ends_with_their_errors(images, tmp_path,
                                                          monkeypatch):
  monkeypatch.setenv("TEST_CRASH", "1")
  with pytest.raises(config_lib.UserError, match="No trial completed"):
    tiny_search(make_config(images, tmp_path, max_trials=4))
  report = read_json(os.path.join(tmp_path, "tuning_report.json"))
  # KerasTuner alone stops after 3 failures in a row.
  assert [t["status"] for t in report["trials"]] == ["FAILED"] * 4
  assert report["trials"][0]["error"] == "RuntimeError: out of memory, say"
  assert not os.path.exists(os.path.join(tmp_path, "best.cfg"))
  assert report["best_workdir"] is None


@pytest.mark.slow
def test_overwrite_semantics(images, tmp_path):
  config = make_config(images, tmp_path, max_trials=1)
  first = tiny_search(config)
  changed = dataclasses.replace(config, search_dropout="0.1:0.5")
  with pytest.raises(config_lib.UserError, match="--search_dropout was '', "
                     "now '0.1:0.5'.*--overwrite_search"):
    tiny_search(changed)
  # More trials is no change of the search: it resumes.
  more = tiny_search(dataclasses.replace(config, max_trials=2))
  assert more["trials"][:1] == first["trials"]
  assert len(more["trials"]) == 2
  fresh = tiny_search(
      dataclasses.replace(changed, overwrite_search=True, max_trials=1))
  assert len(fresh["trials"]) == 1
  assert 0.1 <= fresh["trials"][0]["hyperparameters"]["dropout"] <= 0.5
  # A searched head hyperparameter: no shared head.
  assert fresh["shared_stage_head"] is False
  assert not os.path.exists(os.path.join(tmp_path, "tuner", "trial_1"))
  assert not os.path.exists(os.path.join(tmp_path, "tuner", "shared_heads"))


@pytest.fixture(scope="module")
def early_stopped_search(images, tmp_path_factory):
  """A 1-trial search of two executions (seed 7) that early stopping ends.

  Learning rates so small that val_accuracy never improves, whatever the
  initialisation: with patience 1 each execution stops after the second
  finetune epoch, never in stage head. Returns its workdir (a
  pathlib.Path) and report.
  """
  workdir = tmp_path_factory.mktemp("early_stopped")
  config = make_config(images, workdir, max_trials=1, executions_per_trial=2,
                       seed=7, head_epochs=3, finetune_epochs=4,
                       head_learning_rate=1e-12,
                       search_finetune_learning_rate="1e-12:2e-12",
                       early_stopping_patience=1)
  return workdir, tiny_search(config)


def test_each_execution_starts_from_another_initialisation(
    early_stopped_search):
  workdir, report = early_stopped_search
  trial = workdir / "tuner" / "trials" / "0"
  assert "seed 7" in (trial / "trial.log").read_text()
  assert "seed 8" in (trial / "execution1" / "trial.log").read_text()
  # Each execution ran 5 epochs: the trial records 5, not their sum.
  assert report["trials"][0]["epochs"]["run"] == 5


def test_early_stopping_watches_stage_finetune_only(early_stopped_search):
  workdir, report = early_stopped_search
  assert report["trials"][0]["epochs"] == {
      "budget": 7, "run": 5, "head": 3, "finetune": 2}
  # best.cfg stops the same way, so that it trains the kept model.
  assert "--early_stopping_patience=1\n" in (workdir / "best.cfg").read_text()


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# One process of a distributed search: argv = Config as JSON.
_PROCESS = """
import json, sys
sys.path.insert(0, "tests")
import test_tuning
from tf_finetune import config, tuning
values = json.loads(sys.argv[1])
for name in ("augment", "export_formats"):
  values[name] = tuple(values[name])
try:
  result = test_tuning.tiny_search(config.Config(**values).validate())
except config.UserError as e:
  sys.exit(f"error: {e}")
if result is not None:
  print(tuning.format_summary(result))
"""


def run_distributed(config, tuner_ids, folder, env=()):
  """Runs the chief and workers of one search; returns {id: (code, log)}."""
  values = json.dumps(dataclasses.asdict(config))
  env = {**os.environ, **dict(env), "KERASTUNER_ORACLE_IP": "127.0.0.1",
         "KERASTUNER_ORACLE_PORT": str(free_port())}
  processes = {}
  for tuner_id in tuner_ids:
    with open(folder / f"{tuner_id}.log", "w") as log:
      processes[tuner_id] = subprocess.Popen(
          [sys.executable, "-c", _PROCESS, values], cwd=ROOT,
          stdout=log, stderr=subprocess.STDOUT,
          env={**env, "KERASTUNER_TUNER_ID": tuner_id})
  try:
    codes = {name: p.wait(timeout=600) for name, p in processes.items()}
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
  results = run_distributed(config, ("chief", "tuner0", "tuner1"), tmp_path)
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
    assert builds and logs[name].count("tiny_build: 2 replica(s)") == builds
  assert "trial 0 on" not in logs["chief"]  # The chief only hands them out.
  # The chief cannot reach the workers' models: best.cfg only.
  assert report["best_workdir"] is None
  assert os.path.isfile(os.path.join(config.workdir, "best.cfg"))


@pytest.mark.slow
def test_distributed_search_of_failing_trials_ends(images, tmp_path):
  # KerasTuner alone would stop after 3 failures inside a gRPC call, kill
  # the worker and leave the chief waiting forever.
  config = make_config(images, tmp_path / "work", max_trials=4)
  results = run_distributed(config, ("chief", "tuner0"), tmp_path,
                            env={"TEST_CRASH": "1"})
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
    (["--search_finetune_epochs=0:5"], "both bounds must be at least 1"),
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
  assert set(ranges) == set(config_lib.DEFAULT_SEARCH) == {
      "unfreeze_blocks", "finetune_learning_rate", "finetune_epochs"}
  for name, (low, high) in ranges.items():
    in_bounds = config_lib.SEARCHABLE[name][2]
    assert low < high and in_bounds(low) and in_bounds(high), name
  # The defaults lie inside the space, off its edges where there is room
  # (16 blocks is all of ResNet50's).
  for name, (low, high) in ranges.items():
    top = len(config_lib.RESNET50_BLOCKS) if name == "unfreeze_blocks" else 0
    assert low < getattr(config, name) < high or getattr(config, name) == top
  hp = kt.HyperParameters()
  tuning.FineTuneHyperModel(config).declare_hyperparameters(hp)
  assert {p.name for p in hp.space} == set(ranges)
  assert tuning.shares_stage_head(config)
  # best.cfg-style flags record no search flag, so they never start one.
  trial = tuning.training_config(config, hp.values)
  assert trial.mode == "train" and trial.search_ranges() == ranges
  assert not any(getattr(trial, f"search_{n}") for n in config_lib.SEARCHABLE)


def test_a_searched_finetune_length_scales_the_min_steps_too(tmp_path):
  """README: a trial of E finetune epochs has E / --finetune_epochs of the
  320-step minimum, so the length it searches acts on small data as well;
  a Hyperband budget counts epochs only."""
  config = config_lib.Config(workdir=str(tmp_path), mode="tune").validate()
  assert config.finetune_epochs == 10 and config.finetune_min_steps == 320
  for epochs, min_steps in ((5, 160), (10, 320), (20, 640)):
    trial = tuning.training_config(config, {"finetune_epochs": epochs,
                                            "unfreeze_blocks": 16,
                                            "finetune_learning_rate": 1e-4})
    assert (trial.finetune_epochs, trial.finetune_min_steps) == (
        epochs, min_steps)
  budget = tuning.training_config(config, {
      "finetune_epochs": 10, "unfreeze_blocks": 16,
      "finetune_learning_rate": 1e-4, "tuner/epochs": 6})
  assert budget.finetune_min_steps == 0
  assert budget.head_epochs + budget.finetune_epochs == 6
  fixed = dataclasses.replace(config, search_finetune_epochs="",
                              search_unfreeze_blocks="8:16")
  assert tuning.training_config(fixed, {"unfreeze_blocks": 8}
                                ).finetune_min_steps == 320


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


def test_a_ram_workdir_is_refused_as_trials_cannot_see_it(images):
  # A gs:// workdir works: every process reaches the store.
  with pytest.raises(config_lib.UserError, match="ram://.*gs://"):
    tuning.run_search(make_config(images, "ram://search/work"))


def test_a_search_module_imports_no_training_module():
  # Trials train in child processes: the search process never builds a
  # model or reads a dataset itself (only train.check_data, once).
  source = open(tuning.__file__).read()
  for name in ("data", "model", "distribute", "stages"):
    assert not re.search(rf"^from tf_finetune import .*\b{name}\b|"
                         rf"^from tf_finetune\.{name} ", source, re.M), name


def test_a_shared_head_of_another_stage_head_is_refused(tmp_path):
  from tf_finetune import checkpoints, workdir
  head_writer = config_lib.Config(workdir=str(tmp_path / "a"), head_epochs=2,
                                  shared_head=str(tmp_path / "head"))
  folder = checkpoints.checkpoint_dir(head_writer.shared_head)
  os.makedirs(folder)
  checkpoints.write_pointer(folder, checkpoints.TrainingState(
      epoch=2, step=0, stage="head", records=[], file="ckpt.weights.h5",
      num_optimizer_variables=1,
      fingerprint=config_lib.fingerprint(head_writer)))
  with open(os.path.join(folder, "ckpt.weights.h5"), "w") as f:
    f.write("weights")
  # Other finetune settings share the head: the copy is the run's own.
  other_finetune = dataclasses.replace(head_writer, workdir=str(tmp_path / "b"),
                                       unfreeze_blocks=3, finetune_epochs=7)
  state = workdir.adopt_shared_head(other_finetune)
  assert state.fingerprint == config_lib.fingerprint(other_finetune)
  assert checkpoints.read_state(other_finetune.workdir) == state
  # Another head learning rate does not.
  with pytest.raises(config_lib.UserError, match=r"--shared_head=.* holds the"
                     r" stage head of a run with other settings \("
                     r"--head_learning_rate was 0.001, now 0.01\)"):
    workdir.adopt_shared_head(dataclasses.replace(
        head_writer, workdir=str(tmp_path / "c"), head_learning_rate=1e-2))


@pytest.mark.slow
def test_a_stop_signal_to_the_search_reaches_its_trial(tmp_path):
  # The trial stands in for a training run: on SIGTERM it "checkpoints"
  # and exits 143, as main.py does.
  trial = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
           "print('ready', flush=True)\n"
           "time.sleep(60)\n")
  # Sent once the child (no TensorFlow to import) has set its handler.
  timer = threading.Timer(5.0, os.kill, (os.getpid(), signal.SIGTERM))
  timer.start()
  try:
    outcome = tuning.run_child([sys.executable, "-c", trial],
                               str(tmp_path / "trial.log"))
  finally:
    timer.cancel()
  assert (outcome.returncode, outcome.stopped) == (143, True)
  assert outcome.seconds < 30
  with pytest.raises(tuning._StoppedInTrial) as stopped:
    tuning.trial_results(None, outcome)
  assert stopped.value.exit_code == 143


def test_proposals_outside_the_space_are_clipped_into_it():
  space = kt.HyperParameters()
  space.Int("finetune_epochs", 5, 20, sampling="log", default=10)
  space.Float("finetune_learning_rate", 2e-5, 5e-4, sampling="log",
              default=1e-4)
  # KerasTuner's own mapping: the optimiser's upper bound, 1.0, is max + 1.
  assert space.space[0].prob_to_value(1.0) == 21

  class Proposes(kt.oracles.RandomSearchOracle):
    def populate_space(self, trial_id):
      return {"status": kt.engine.trial.TrialStatus.RUNNING,
              "values": {"finetune_epochs": 21,
                         "finetune_learning_rate": 6e-4}}

  oracle = tuning.defaults_first(Proposes)(
      objective=kt.Objective("val_accuracy", "max"), max_trials=3, seed=1,
      hyperparameters=space)
  assert oracle.populate_space("0")["values"] == {
      "finetune_epochs": 10, "finetune_learning_rate": 1e-4}
  oracle.trials["0"] = None  # Trial 0 exists: the next is a proposal.
  assert oracle.populate_space("1")["values"] == {
      "finetune_epochs": 20, "finetune_learning_rate": 5e-4}

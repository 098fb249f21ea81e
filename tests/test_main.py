"""The command line end to end: the real ResNet50 path through `main`."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

# run_cli and the session-wide smoke_run fixture live in conftest.py.
from conftest import ROOT, run_cli
from tf_finetune import config as config_lib

# What the `tf-finetune` script pip writes does: sys.argv[0] is the script,
# and tf_finetune.main is imported under its own name, not as __main__.
AS_CONSOLE_SCRIPT = ("import sys; from tf_finetune.main import run; "
                     "sys.argv[0] = 'tf-finetune'; sys.exit(run())")
# Every test here starts the command line in a new process.
pytestmark = pytest.mark.slow


def test_training_run_writes_the_workdir_layout(smoke_run):
  workdir, _ = smoke_run
  for name in ("flags.cfg", "report.json", "model.keras",
               "logs/training.csv", "export/1/saved_model.pb", "curves.png"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "export")) == ["1"]


def test_report_has_the_contract_fields(smoke_run):
  workdir, _ = smoke_run
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  assert report["class_names"] == sorted(report["class_names"])
  assert len(report["class_names"]) >= 4
  counts = report["num_examples"]
  assert counts["train"] > 0 and counts["val"] > 0 and counts["test"] > 0
  assert report["skipped_files"] == []
  assert [s["name"] for s in report["stages"]] == ["head", "finetune"]
  head, finetune = report["stages"]
  assert (head["learning_rate"], finetune["learning_rate"]) == (1e-3, 1e-4)
  assert head["epochs"] == finetune["epochs"] == 1
  # Stage head on cached features is a linear probe, its L2 picked on val.
  grid = head["probe"]["grid"]
  assert len(grid) == 13 and all(0 <= p["val_accuracy"] <= 1 for p in grid)
  assert head["probe"]["chosen"] in grid
  assert head["probe"]["chosen"]["val_accuracy"] == max(
      p["val_accuracy"] for p in grid)
  assert finetune["trainable_params"] > head["trainable_params"] > 0
  for stage in report["stages"]:
    assert stage["seconds"] > 0
    assert len(stage["history"]["loss"]) == 1
    assert len(stage["history"]["val_accuracy"]) == 1
  assert 0.0 <= report["val_accuracy"] <= 1.0
  assert 0.0 <= report["test_accuracy"] <= 1.0
  assert report["export_path"] == os.path.join(workdir, "export", "1")
  assert set(report["images_per_second"]) == {"head", "finetune"}
  calibrated = report["calibration"]
  assert (calibrated["split"], calibrated["bins"]) == ("val", 15)
  assert calibrated["num_examples"] == counts["val"]
  assert 0.05 <= calibrated["fitted_temperature"] <= 20
  assert 0 <= calibrated["p_value"] <= 1
  before, after = calibrated["before"], calibrated["after"]
  assert after["nll"] <= before["nll"]
  # Folded only when significant; otherwise served as trained.
  if calibrated["p_value"] >= 0.05 or calibrated["at_bound"]:
    assert calibrated["temperature"] == 1.0 and after == before
  else:
    assert calibrated["temperature"] == calibrated["fitted_temperature"]
  # The temperature changes no prediction's class.
  assert after["accuracy"] == before["accuracy"] == pytest.approx(
      report["val_accuracy"], abs=1e-6)
  for figures in (before, after):
    assert 0 <= figures["ece"] <= 1 and 0 < figures["mean_confidence"] <= 1


def test_flags_cfg_is_a_reusable_flagfile(smoke_run):
  workdir, _ = smoke_run
  with open(os.path.join(workdir, "flags.cfg")) as f:
    lines = f.read().split()
  assert f"--workdir={workdir}" in lines
  assert "--image_size=32" in lines and "--unfreeze_blocks=1" in lines
  # Parsing it back validates every line, without training.
  result = run_cli(f"--flagfile={workdir}/flags.cfg", "--image_size=16")
  assert result.returncode == 2
  assert "--image_size=16" in result.stderr


def test_served_model_equals_the_keras_model(smoke_run):
  """TF Model Garden style round trip on the real ResNet50 model: PNG and
  JPEG bytes through serving_default, pixels through serving_tensor."""
  workdir, _ = smoke_run
  import keras
  import tensorflow as tf
  from tf_finetune.saved_models import load_model_safely
  model = load_model_safely(os.path.join(workdir, "model.keras"))
  served = tf.saved_model.load(os.path.join(workdir, "export", "1"))
  with open(os.path.join(workdir, "report.json")) as f:
    class_names = np.array(json.load(f)["class_names"])
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3),
                                             dtype=np.uint8)
  expected = model.predict(images, verbose=0)
  by_tensor = served.signatures["serving_tensor"](images=tf.constant(images))
  png = [tf.io.encode_png(image).numpy() for image in images]
  by_bytes = served.signatures["serving_default"](image_bytes=tf.constant(png))
  np.testing.assert_allclose(by_tensor["probabilities"], expected, atol=1e-5)
  np.testing.assert_allclose(by_bytes["probabilities"], expected, atol=1e-5)
  # JPEG is lossy: compare with the model on the decoded pixels.
  jpeg = [tf.io.encode_jpeg(image, quality=90).numpy() for image in images]
  decoded = np.stack([tf.io.decode_jpeg(e, channels=3).numpy() for e in jpeg])
  by_jpeg = served.signatures["serving_default"](image_bytes=tf.constant(jpeg))
  np.testing.assert_allclose(by_jpeg["probabilities"],
                             model.predict(decoded, verbose=0), atol=1e-5)
  for outputs, pixels in ((by_tensor, images), (by_bytes, images),
                          (by_jpeg, decoded)):
    top = [name.decode() for name in outputs["classes"].numpy()[:, 0]]
    argmax = model.predict(pixels, verbose=0).argmax(axis=-1)
    assert top == list(class_names[argmax])


def test_export_mode_adds_a_version(smoke_run, tmp_path):
  # On a copy: the session's run keeps its one version (conftest.py).
  workdir, data_dir = smoke_run
  copy = str(tmp_path / "work")
  shutil.copytree(workdir, copy)
  exported = run_cli("--flagfile=configs/smoke.cfg", f"--workdir={copy}",
                     f"--data_dir={data_dir}", "--mode=export",
                     "--max_image_pixels=1000000")
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(copy, "export"))) == ["1", "2"]
  assert os.listdir(os.path.join(workdir, "export")) == ["1"]
  # The flag reaches the new version; the run's own export has the default.
  from tf_finetune import export  # pylint: disable=g-import-not-at-top
  limits = [export.read_metadata(os.path.join(copy, "export", version))
            ["max_image_pixels"] for version in ("1", "2")]
  assert limits == [89478485, 1000000]


def _write_images(folder, count, size=40):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(len(folder))
  for i in range(count):
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))


def help_output(entry_point):
  if entry_point == "module":
    command = [sys.executable, "-m", "tf_finetune.main"]
  elif entry_point == "console_script_reproduced":
    command = [sys.executable, "-c", AS_CONSOLE_SCRIPT]
  else:
    script = os.path.join(os.path.dirname(sys.executable), "tf-finetune")
    if not os.path.isfile(script):
      pytest.skip("the tf-finetune console script is not installed")
    command = [script]
  # PYTHONPATH: the installed script then imports this checkout's package.
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
  result = subprocess.run([*command, "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  return result.stdout


def listed_flags(help_text):
  """{'workdir', 'cache_features', ...} from absl's `--help` text."""
  return set(re.findall(r"^  --(?:\[no\])?(\w+):", help_text, re.M))


@pytest.mark.parametrize("entry_point", ["console_script_reproduced",
                                         "console_script"])
def test_help_lists_the_package_flags_from_every_entry_point(entry_point):
  listed = listed_flags(help_output(entry_point))
  assert {"workdir", "unfreeze_blocks"} <= listed
  # Every setting of a run is a flag, and --help shows all of them.
  assert {f.name for f in dataclasses.fields(config_lib.Config)} <= listed
  assert listed == listed_flags(help_output("module"))


@pytest.mark.parametrize("flag, choices", [
    ("--tuner=grid", "<hyperband|bayesian|random>"),
    ("--objective=auc", "<val_accuracy|val_loss|accuracy|loss>"),
    ("--mode=serve", "<train|evaluate|export|predict|tune>"),
])
def test_flags_with_fixed_choices_list_them_when_refused(tmp_path, flag,
                                                         choices):
  result = run_cli(f"--workdir={tmp_path}", flag, timeout=60)
  assert result.returncode == 2
  # One paragraph naming the flag and its choices; absl's own "FATAL" line
  # and exit code 1 are replaced.
  assert result.stderr.startswith(f"tf_finetune: error: flag {flag}: ")
  assert choices in result.stderr
  assert result.stderr.count("\n") == 1


def test_stray_arguments_are_an_error(tmp_path):
  result = run_cli(f"--workdir={tmp_path}", "configs/smoke.cfg", timeout=60)
  assert result.returncode == 2
  assert "unexpected arguments ['configs/smoke.cfg']" in result.stderr
  assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("flags, culprit", [
    (["--unfreeze_blocks=17"], "--unfreeze_blocks=17"),
    (["--unfreeze_blocks=-1"], "--unfreeze_blocks=-1"),
    (["--image_size=31"], "--image_size=31"),
    (["--dataset=s3:bucket"], "--dataset='s3:bucket'"),
    (["--val_fraction=1.5"], "--val_fraction=1.5"),
    (["--head_epochs=0", "--finetune_epochs=0"],
     "--head_epochs plus --finetune_epochs"),
])
def test_bad_flag_values_fail_fast_naming_the_flag(tmp_path, flags, culprit):
  result = run_cli("--flagfile=configs/smoke.cfg", f"--workdir={tmp_path}",
                   *flags, timeout=60)
  assert result.returncode == 2
  assert culprit in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", config_lib.MODES)
@pytest.mark.parametrize("workdir", [[], ["--workdir="]], ids=["unset", "empty"])
def test_missing_workdir_is_an_error_in_every_mode(mode, workdir):
  result = run_cli("--flagfile=configs/smoke.cfg", f"--mode={mode}", *workdir,
                   timeout=60)
  assert result.returncode == 2
  assert "--workdir is required" in result.stderr
  assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("layout, culprit", [
    ({}, "missing"),                              # no folder at all
    ({"only": 4}, "only"),                        # one class
    ({"cats": 4, "dogs": 0}, "dogs"),             # an empty class
])
def test_bad_folders_fail_naming_the_culprit(tmp_path, layout, culprit):
  root = tmp_path / "images"
  for name, count in layout.items():
    _write_images(str(root / name), count)
  folder = str(tmp_path / "missing") if not layout else str(root)
  result = run_cli("--flagfile=configs/smoke.cfg",
                   f"--workdir={tmp_path / 'work'}", f"--dataset=folder:{folder}",
                   timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  message = result.stderr.split("tf_finetune: error:")[-1]
  assert culprit in message
  assert "Traceback" not in result.stderr


def test_mismatched_weights_file_fails_naming_the_file(tmp_path):
  import keras
  other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
  path = str(tmp_path / "other.weights.h5")
  other.save_weights(path)
  root = tmp_path / "images"
  for name in ("a", "b"):
    _write_images(str(root / name), 6)
  result = run_cli("--flagfile=configs/smoke.cfg", f"--workdir={tmp_path / 'w'}",
                   f"--dataset=folder:{root}", f"--weights={path}", timeout=180)
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"--weights='{path}'" in result.stderr
  assert "does not hold the weights of ResNet50" in result.stderr

"""The finished run seen through the tools users point at it: the real
TensorBoard server over WORKDIR/logs/ (of a tiny model's run), and
`saved_model_cli` over the export of the session's one training run
(conftest.py)."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import keras
import numpy as np
import pytest

from test_fault_tolerance import run_tiny, tiny_config
from tf_finetune import export, stages

# Generous: the machine is shared; these only bound a hang, they assert
# nothing about speed.
STARTUP_DEADLINE_SECONDS = 240
TOOL_TIMEOUT_SECONDS = 300


def read_report(workdir):
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)


# ------------------------------------------------------------- TensorBoard


def start_tensorboard(logdir, output_path):
  """Starts TensorBoard on a free loopback port; returns (process, url)."""
  output = open(output_path, "w")
  process = subprocess.Popen(
      [sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}",
       "--host=127.0.0.1", "--port=0",
       # One process: the Rust data server would be a second one to stop.
       "--load_fast=false"],
      stdout=output, stderr=subprocess.STDOUT)
  output.close()
  deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
  while time.monotonic() < deadline and process.poll() is None:
    with open(output_path) as f:
      match = re.search(r"http://127\.0\.0\.1:(\d+)/", f.read())
    if match:
      return process, f"http://127.0.0.1:{match.group(1)}"
    time.sleep(0.5)
  stop(process)
  with open(output_path) as f:
    pytest.fail("TensorBoard did not start:\n" + f.read()[-3000:])


def stop(process):
  process.terminate()
  try:
    process.wait(timeout=30)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()


def get_json(url):
  with urllib.request.urlopen(url, timeout=60) as response:
    return json.load(response)


def wait_for_tags(url, wanted):
  """Polls the scalars plugin until every run has its wanted tags loaded."""
  deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
  while True:
    tags = get_json(f"{url}/data/plugin/scalars/tags")
    if all(set(t) <= set(tags.get(run, {})) for run, t in wanted.items()):
      return tags
    if time.monotonic() > deadline:
      pytest.fail(f"TensorBoard never showed {wanted}; it has {tags}")
    time.sleep(1)


def get_scalars(url, run, tag):
  """[(step, value)] of one run's tag, through TensorBoard's HTTP API."""
  query = urllib.parse.urlencode({"run": run, "tag": tag})
  rows = get_json(f"{url}/data/plugin/scalars/scalars?{query}")
  return [(step, value) for _, step, value in rows]


@pytest.mark.slow  # Starts TensorBoard.
def test_tensorboard_serves_both_stages_on_one_epoch_axis(tmp_path):
  # The tiny model of test_fault_tolerance.py, trained through the package's
  # own logging (train.fit_remaining), stage head on cached features: two
  # fits. Several epochs per stage, and a warmup longer than stage
  # finetune's first epoch, so that the logged learning rates pass through
  # the warmup, the cosine decay and the stage boundary.
  config = tiny_config(tmp_path, head_epochs=2, finetune_epochs=3,
                       warmup_fraction=0.5, save_every_steps=0)
  _, callback = run_tiny(config)
  plan = callback.plan
  head, finetune = callback.stage_reports()
  process, url = start_tensorboard(os.path.join(config.workdir, "logs"),
                                   str(tmp_path / "tensorboard.log"))
  try:
    wait_for_tags(url, {
        "train": ["epoch_loss", "epoch_accuracy", "epoch_learning_rate"],
        "validation": ["epoch_loss", "epoch_accuracy"]})
    scalars = {(run, tag): get_scalars(url, run, f"epoch_{tag}")
               for run in ("train", "validation")
               for tag in ("loss", "accuracy")}
    learning_rate = get_scalars(url, "train", "epoch_learning_rate")
  finally:
    stop(process)
  assert process.returncode is not None
  for (run, tag), rows in scalars.items():
    key = tag if run == "train" else f"val_{tag}"
    # Epochs 0, 1, ... of both stages on one axis, each value the one the
    # stage record holds for that epoch of that stage.
    assert [step for step, _ in rows] == list(range(plan.total_epochs))
    np.testing.assert_allclose([value for _, value in rows],
                               head["history"][key] + finetune["history"][key],
                               rtol=1e-6)
  # The rate at each epoch's end: the stage's schedule at the steps its own
  # optimizer has taken by then (each stage starts a new one).
  expected = [float(plan.schedule_of(stage)(epoch * plan.steps_per_epoch))
              for stage in (stages.HEAD, stages.FINETUNE)
              for epoch in range(1, plan.epochs_of(stage) + 1)]
  assert [step for step, _ in learning_rate] == list(range(plan.total_epochs))
  np.testing.assert_allclose([value for _, value in learning_rate], expected,
                             rtol=1e-6, atol=1e-12)
  # Stage finetune's first epoch ends inside its warmup.
  assert 0 < learning_rate[plan.head_epochs][1] < plan.finetune_learning_rate


# ---------------------------------------------------------- saved_model_cli


def saved_model_cli(*args):
  """Runs the `saved_model_cli` installed with TensorFlow."""
  script = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  result = subprocess.run([script, *args], capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT_SECONDS)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def parse_signatures(text):
  """`show --all` output -> {signature: {(kind, name): (dtype, shape)}}."""
  signatures = {}
  for name, body in re.findall(
      r"signature_def\['(\w+)'\]:(.*?)Method name is", text, re.DOTALL):
    signatures[name] = {
        (kind, tensor): (dtype, shape) for kind, tensor, dtype, shape in
        re.findall(r"(inputs|outputs)\['(\w+)'\] tensor_info:\s+"
                   r"dtype: (\w+)\s+shape: (\S+(?: -?\d+[,)])*)", body)}
  return signatures


def test_saved_model_cli_shows_the_contract(smoke_run):
  workdir, _ = smoke_run
  path = export.latest_version_path(os.path.join(workdir, "export"))
  k = num_classes = len(read_report(workdir)["class_names"])  # top_k=5, C=5
  outputs = {("outputs", "probabilities"): ("DT_FLOAT", f"(-1, {num_classes})"),
             ("outputs", "classes"): ("DT_STRING", f"(-1, {k})"),
             ("outputs", "scores"): ("DT_FLOAT", f"(-1, {k})")}
  signatures = parse_signatures(
      saved_model_cli("show", "--dir", path, "--all"))
  # TF's own init op is listed too; serving signatures are the two above.
  assert {n for n in signatures if not n.startswith("__")} == {
      "serving_default", "serving_tensor"}
  assert signatures["serving_default"] == {
      ("inputs", "image_bytes"): ("DT_STRING", "(-1)"), **outputs}
  assert signatures["serving_tensor"] == {
      ("inputs", "images"): ("DT_UINT8", "(-1, 32, 32, 3)"), **outputs}


def test_saved_model_cli_runs_serving_tensor(smoke_run, tmp_path):
  workdir, _ = smoke_run
  path = export.latest_version_path(os.path.join(workdir, "export"))
  images = np.random.default_rng(7).integers(0, 256, (2, 32, 32, 3),
                                             dtype=np.uint8)
  np.save(tmp_path / "images.npy", images)
  saved_model_cli("run", "--dir", path, "--tag_set", "serve",
                  "--signature_def", "serving_tensor",
                  "--inputs", f"images={tmp_path / 'images.npy'}",
                  "--outdir", str(tmp_path / "out"))
  from tf_finetune.saved_models import load_model_safely
  model = load_model_safely(os.path.join(workdir, "model.keras"))
  expected = model.predict(images, verbose=0)
  names = np.array(read_report(workdir)["class_names"])
  np.testing.assert_allclose(np.load(tmp_path / "out" / "probabilities.npy"),
                             expected, atol=1e-5)
  classes = np.load(tmp_path / "out" / "classes.npy", allow_pickle=True)
  assert [c.decode() for c in classes[:, 0]] == list(
      names[expected.argmax(axis=-1)])


# ------------------------------------------------------- plain Keras loading

# Loads model.keras the way a user without tf_finetune would: Keras only,
# safe_mode at its default (on). Writes the predictions to argv[3].
LOAD_WITH_KERAS_ONLY = r"""
import sys
import keras
import numpy as np
model = keras.saving.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))
imported = sorted(name for name in sys.modules if name.startswith("tf_finetune"))
assert not imported, f"loading imported {imported}"
"""


def test_model_keras_loads_and_predicts_without_the_package(smoke_run,
                                                            tmp_path):
  workdir, _ = smoke_run
  images = np.random.default_rng(11).integers(0, 256, (4, 32, 32, 3),
                                              dtype=np.uint8)
  np.save(tmp_path / "images.npy", images)
  # -I: neither the working directory nor PYTHONPATH is on sys.path. The
  # package may still be installed in this Python; the script checks that
  # it was not imported.
  result = subprocess.run(
      [sys.executable, "-I", "-c", LOAD_WITH_KERAS_ONLY,
       os.path.join(workdir, "model.keras"), str(tmp_path / "images.npy"),
       str(tmp_path / "predicted.npy")],
      cwd=tmp_path, capture_output=True, text=True,
      timeout=TOOL_TIMEOUT_SECONDS)
  assert result.returncode == 0, result.stderr[-3000:]
  import tensorflow as tf
  served = tf.saved_model.load(
      export.latest_version_path(os.path.join(workdir, "export")))
  expected = served.signatures["serving_tensor"](images=tf.constant(images))
  np.testing.assert_allclose(np.load(tmp_path / "predicted.npy"),
                             expected["probabilities"].numpy(), atol=1e-5)

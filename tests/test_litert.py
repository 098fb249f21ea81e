"""Tests for tf_finetune.litert: LiteRT models of the export (float32 and
int8), equal to the SavedModel they sit in, and --mode=predict and
--mode=evaluate running them."""

import glob
import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli
from test_export import CLASS_NAMES, SIZE, build_tiny_model, make_images
from tf_finetune import decode, export, litert, predict
from tf_finetune.config import Config, UserError

# Converting the ResNet50 twice takes about a minute: once per module.
SLOW_FIXTURES = frozenset({"resnet_export"})
# The float model computes what TensorFlow computes, up to float rounding.
FLOAT_ATOL = 1e-4


def demo_images(data_dir, count):
  """`count` of the smoke run's demo images, decoded as training decodes
  them, and their paths."""
  paths = sorted(glob.glob(os.path.join(data_dir, "**", "*.png"),
                           recursive=True))[:count]
  pixels = np.stack([decode.decode_and_resize(tf.io.read_file(p), SIZE).numpy()
                     for p in paths])
  return paths, pixels


@pytest.fixture(scope="module")
def resnet_export(smoke_run, tmp_path_factory):
  """The smoke run's ResNet50 (32 px) exported with LiteRT models to a
  folder of this module (the smoke run's own export folder stays as the
  run left it): (keras model, class names, version path)."""
  workdir, _ = smoke_run
  model = keras.saving.load_model(os.path.join(workdir, "model.keras"))
  with open(os.path.join(workdir, "report.json")) as f:
    class_names = json.load(f)["class_names"]
  root = str(tmp_path_factory.mktemp("litert_export"))
  version = export.export_saved_model(
      model, class_names, SIZE, root, formats=("saved_model", "tflite"))
  return model, class_names, version


@pytest.fixture(scope="module")
def reference(resnet_export, smoke_run):
  """(8 demo images, the SavedModel's probabilities, the Keras model's)."""
  model, _, version = resnet_export
  _, images = demo_images(smoke_run[1], 8)
  loaded = export.load_serving(version)
  by_saved_model = loaded.signatures["serving_tensor"](
      images=tf.constant(images))["probabilities"].numpy()
  return images, by_saved_model, model.predict(images, verbose=0)


@pytest.fixture(scope="module")
def tflite_models(resnet_export):
  """{runtime: TFLiteClassifier} of the export's two .tflite files."""
  version = resnet_export[2]
  return {runtime: litert.TFLiteClassifier(litert.model_path(version, runtime))
          for runtime in ("tflite", "tflite_int8")}


def test_version_holds_the_tflite_folder_beside_the_saved_model(
    resnet_export):
  _, class_names, version = resnet_export
  root = os.path.dirname(version)
  # TF Serving's view is unchanged: one version, a SavedModel.
  assert export.list_versions(root) == [1]
  assert os.path.isfile(os.path.join(version, "saved_model.pb"))
  folder = os.path.join(version, "tflite")
  assert sorted(os.listdir(folder)) == ["labels.txt", "metadata.json",
                                        "model.tflite", "model_int8.tflite"]
  assert litert.read_labels(version) == class_names
  # Dynamic-range int8 weights: about a quarter of the float32 file.
  float_size = os.path.getsize(os.path.join(folder, "model.tflite"))
  int8_size = os.path.getsize(os.path.join(folder, "model_int8.tflite"))
  assert int8_size < 0.3 * float_size


@pytest.mark.parametrize("batch", [1, 8])
def test_float_tflite_predicts_what_the_saved_model_predicts(
    reference, tflite_models, batch):
  images, by_saved_model, by_keras = reference
  # One request of `batch` images at a time: the model takes [1 or N, ...].
  got = np.concatenate([tflite_models["tflite"](images[i:i + batch])
                        for i in range(0, len(images), batch)])
  np.testing.assert_allclose(got, by_saved_model, atol=FLOAT_ATOL, rtol=0)
  np.testing.assert_allclose(got, by_keras, atol=FLOAT_ATOL, rtol=0)


def test_int8_tflite_agrees_on_the_top_class(reference, tflite_models):
  images, by_saved_model, _ = reference
  agreeing = (tflite_models["tflite_int8"](images).argmax(-1)
              == by_saved_model.argmax(-1))
  # The smoke model's backbone has random weights, so some of its top two
  # classes are nearly tied and int8 weights may swap them; on real images
  # (the transfer benchmark, BUILD_NOTES "LiteRT models") the int8 model
  # agrees on 99% of 5,000 test images.
  assert agreeing.sum() >= len(agreeing) - 2


def test_predict_mode_on_tflite_classifies_like_the_saved_model(
    resnet_export, smoke_run, tmp_path):
  _, _, version = resnet_export
  paths, _ = demo_images(smoke_run[1], 5)
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  for i, path in enumerate(paths):
    (inputs / f"{i}.png").write_bytes(open(path, "rb").read())
  results = {}
  for runtime in ("tensorflow", "tflite"):
    config = Config(workdir=str(tmp_path / runtime), mode="predict",
                    inputs=str(inputs), runtime=runtime, batch_size=2,
                    export_dir=os.path.dirname(version)).validate()
    results[runtime] = predict.run_prediction(config)
  assert results["tflite"]["export_path"] == os.path.join(
      version, "tflite", "model.tflite")
  by_tensorflow, by_tflite = (results[r]["predictions"]
                              for r in ("tensorflow", "tflite"))
  assert [p["file"] for p in by_tflite] == [p["file"] for p in by_tensorflow]
  assert len(by_tflite) == 5
  assert [p["classes"][0] for p in by_tflite] == [
      p["classes"][0] for p in by_tensorflow]
  np.testing.assert_allclose([p["scores"] for p in by_tflite],
                             [p["scores"] for p in by_tensorflow],
                             atol=FLOAT_ATOL, rtol=0)


def test_evaluate_mode_on_tflite_reports_the_comparison(resnet_export,
                                                        smoke_flags, tmp_path):
  _, _, version = resnet_export
  workdir = tmp_path / "evaluation"
  # --workdir after the smoke flags: the last one wins; the export is ours.
  result = run_cli(*smoke_flags, "--mode=evaluate", "--runtime=tflite_int8",
                   f"--export_dir={os.path.dirname(version)}",
                   f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  evaluation = json.loads((workdir / "evaluation.json").read_text())
  assert evaluation["runtime"] == "tflite_int8"
  comparison = evaluation["litert"]
  folder = os.path.join(version, "tflite")
  assert comparison["size_bytes"] == {
      "tflite": os.path.getsize(os.path.join(folder, "model.tflite")),
      "tflite_int8": os.path.getsize(os.path.join(folder,
                                                  "model_int8.tflite"))}
  assert comparison["float_max_abs_difference"] < FLOAT_ATOL
  assert comparison["float_top1_agreement"] == 1.0
  assert comparison["int8_top1_agreement"] >= 0.9
  assert set(comparison["latency_ms"]) == {"saved_model", "tflite",
                                           "tflite_int8"}
  assert all(ms > 0 for ms in comparison["latency_ms"].values())
  assert "tflite_int8: " in result.stdout
  assert f"{evaluation['split']} accuracy: " in result.stdout


def test_a_rerun_adds_tflite_models_to_its_own_version(tmp_path):
  model = build_tiny_model()
  root = str(tmp_path / "export")
  first = export.export_saved_model(model, CLASS_NAMES, SIZE, root,
                                    run_id="run-a")
  assert not litert.has_tflite_models(first)
  again = export.export_saved_model(model, CLASS_NAMES, SIZE, root,
                                    run_id="run-a",
                                    formats=("saved_model", "tflite"))
  assert again == first and export.list_versions(root) == [1]
  images = make_images(4)
  got = litert.TFLiteClassifier(litert.model_path(again, "tflite"))(images)
  np.testing.assert_allclose(got, model.predict(images, verbose=0),
                             atol=FLOAT_ATOL, rtol=0)
  assert litert.read_labels(again) == list(CLASS_NAMES)


def test_runtime_without_tflite_models_names_the_export_flag(tmp_path):
  root = str(tmp_path / "export")
  version = export.export_saved_model(build_tiny_model(), CLASS_NAMES, SIZE,
                                      root)
  with pytest.raises(UserError, match="--export_formats=saved_model,tflite"):
    litert.model_path(version, "tflite")


@pytest.mark.parametrize("formats, message", [
    (("bad",), "--export_formats='bad': unknown format 'bad'"),
    (("saved_model", "onnx"), "unknown format 'onnx'"),
    (("tflite",), "must include saved_model"),
    ((), "must include saved_model"),
])
def test_bad_export_formats_are_refused(tmp_path, formats, message):
  with pytest.raises(UserError, match=message) as error:
    Config(workdir=str(tmp_path), export_formats=formats).validate()
  assert "\n" not in str(error.value)


@pytest.mark.slow
def test_bad_export_formats_flag_fails_in_one_line(tmp_path):
  result = run_cli(f"--workdir={tmp_path}", "--export_formats=bad",
                   timeout=60)
  assert result.returncode == 2
  assert result.stderr.startswith(
      "tf_finetune: error: --export_formats='bad': ")
  assert result.stderr.count("\n") == 1


def test_missing_litert_runtime_names_the_pip_command(monkeypatch, tmp_path):
  path = tmp_path / "model.tflite"
  path.write_bytes(b"")
  # None in sys.modules makes the import raise ImportError.
  monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
  with pytest.raises(UserError, match="pip install ai-edge-litert"):
    litert.TFLiteClassifier(str(path))

"""Tests for tf_finetune.predict: image files through the exported model,
bad files reported one by one, and --mode=predict on the real run."""

import dataclasses
import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import image_cases
from conftest import run_cli
from test_export import CLASS_NAMES, SIZE, build_tiny_model, make_images
from tf_finetune import decode, export, file_check, predict, saved_models
from tf_finetune.config import Config, UserError


def write_inputs(folder, images):
  """Good PNGs (one in a sub-folder), a corrupt JPEG and an empty PNG."""
  os.makedirs(os.path.join(folder, "sub"))
  good = [os.path.join(folder, "a.png"), os.path.join(folder, "b.png"),
          os.path.join(folder, "sub", "c.png")][:len(images)]
  for path, image in zip(good, images):
    tf.io.write_file(path, tf.io.encode_png(image))
  with open(os.path.join(folder, "corrupt.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
  open(os.path.join(folder, "empty.png"), "wb").close()
  return good


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  """(model, export root) of the small model from test_export.py."""
  model = build_tiny_model()
  root = str(tmp_path_factory.mktemp("export"))
  export.export_saved_model(model, CLASS_NAMES, SIZE, root, top_k=2)
  return model, root


def predict_config(tmp_path, inputs, export_root):
  return Config(workdir=str(tmp_path / "work"), mode="predict",
                inputs=inputs, export_dir=export_root,
                batch_size=2).validate()


def expected_top2(model, paths):
  pixels = np.stack([decode.decode_and_resize(tf.io.read_file(p), SIZE).numpy()
                     for p in paths])
  probabilities = model.predict(pixels, verbose=0)
  top = np.argsort(-probabilities, axis=-1)[:, :2]
  return ([[CLASS_NAMES[i] for i in row] for row in top],
          np.take_along_axis(probabilities, top, axis=-1))


def check_predictions(result, model, good):
  assert [p["file"] for p in result["predictions"]] == good
  classes, scores = expected_top2(model, good)
  assert [p["classes"] for p in result["predictions"]] == classes
  np.testing.assert_allclose([p["scores"] for p in result["predictions"]],
                             scores, atol=1e-5)


def test_list_inputs_takes_image_files_recursively(tmp_path):
  for name in ("b.png", "a.JPG", "sub/c.gif", "notes.txt", ".hidden.png",
               ".cache/d.png"):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"")
  assert predict.list_inputs(str(tmp_path)) == [
      str(tmp_path / "a.JPG"), str(tmp_path / "b.png"),
      str(tmp_path / "sub" / "c.gif")]
  # A single file is taken whatever its name.
  assert predict.list_inputs(str(tmp_path / "notes.txt")) == [
      str(tmp_path / "notes.txt")]
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="--inputs=.*empty.*no image files"):
    predict.list_inputs(str(tmp_path / "empty"))


def test_bad_files_are_reported_per_file(tiny_export, tmp_path):
  model, root = tiny_export
  good = write_inputs(str(tmp_path / "in"), make_images(3, seed=3))
  config = predict_config(tmp_path, str(tmp_path / "in"), root)
  result = predict.run_prediction(config)
  check_predictions(result, model, good)
  skipped = {os.path.basename(s["path"]): s["reason"]
             for s in result["skipped_files"]}
  assert set(skipped) == {"corrupt.jpg", "empty.png"}
  # "file", deprecated, repeats "path" for one release.
  assert all(s["file"] == s["path"] for s in result["skipped_files"])
  assert skipped["corrupt.jpg"].startswith("undecodable JPEG")
  assert skipped["empty.png"] == "empty file (0 bytes)"
  assert result["export_path"] == os.path.join(root, "1")
  with open(os.path.join(config.workdir, "predictions.json")) as f:
    assert json.load(f) == result


def test_a_bad_file_the_check_missed_fails_alone(tiny_export, tmp_path,
                                                 monkeypatch):
  # Even if the up-front check lets a file through, the serving call that
  # fails on it must not take its batch mates down.
  model, root = tiny_export
  good = write_inputs(str(tmp_path / "in"), make_images(3, seed=4))
  monkeypatch.setattr(file_check, "find_undecodable",
                      lambda paths, **unused: {})
  result = predict.run_prediction(
      predict_config(tmp_path, str(tmp_path / "in"), root))
  check_predictions(result, model, good)
  reasons = {os.path.basename(s["path"]): s["reason"]
             for s in result["skipped_files"]}
  assert set(reasons) == {"corrupt.jpg", "empty.png"}
  for reason in reasons.values():
    assert reason.startswith("not a decodable image: ")
    assert "{{" not in reason and "[[" not in reason


def test_latest_version_is_used(tiny_export, tmp_path):
  model, _ = tiny_export
  root = str(tmp_path / "export")
  export.export_saved_model(model, CLASS_NAMES, SIZE, root)
  other = build_tiny_model(len(CLASS_NAMES))
  other.set_weights([w * 0.5 for w in model.get_weights()])
  export.export_saved_model(other, CLASS_NAMES, SIZE, root, top_k=2)
  good = write_inputs(str(tmp_path / "in"), make_images(2, seed=5))
  result = predict.run_prediction(
      predict_config(tmp_path, str(tmp_path / "in"), root))
  assert result["export_path"] == os.path.join(root, "2")
  check_predictions(result, other, good)


def test_no_export_is_a_clear_error(tmp_path):
  (tmp_path / "x.png").write_bytes(b"")
  config = predict_config(tmp_path, str(tmp_path / "x.png"),
                          str(tmp_path / "export"))
  with pytest.raises(UserError, match="--export_dir=.*no exported model"):
    predict.run_prediction(config)


def test_predict_mode_on_the_trained_run(smoke_run, smoke_flags, tmp_path):
  workdir, data_dir = smoke_run
  folder = tmp_path / "in"
  folder.mkdir()
  sources = sorted(glob.glob(os.path.join(data_dir, "*", "*", "*_00[01].png")))
  for source in sources:
    (folder / os.path.basename(source)).write_bytes(open(source, "rb").read())
  (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  result = run_cli(*smoke_flags, "--mode=predict", f"--inputs={folder}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"skipped {folder / 'broken.png'}: undecodable PNG" in (
      result.stderr)
  with open(os.path.join(workdir, "predictions.json")) as f:
    predictions = json.load(f)
  assert predictions["export_path"] == export.latest_version_path(
      os.path.join(workdir, "export"))
  good = sorted(str(folder / os.path.basename(s)) for s in sources)
  assert [p["file"] for p in predictions["predictions"]] == good
  assert [s["path"] for s in predictions["skipped_files"]] == [
      str(folder / "broken.png")]
  # What the served model says equals the Keras model on the same pixels.
  model = saved_models.load_model_safely(os.path.join(workdir, "model.keras"))
  with open(os.path.join(workdir, "report.json")) as f:
    names = json.load(f)["class_names"]
  pixels = np.stack([decode.decode_and_resize(tf.io.read_file(p), 32).numpy()
                     for p in good])
  probabilities = model.predict(pixels, verbose=0)
  for entry, row in zip(predictions["predictions"], probabilities):
    order = np.argsort(-row)
    assert entry["classes"] == [names[i] for i in order]
    np.testing.assert_allclose(entry["scores"], row[order], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--inputs=/no/such/place"], "--inputs='/no/such/place': no such file"),
    ([], "--mode=predict needs --inputs=FILE_OR_DIR"),
])
def test_bad_inputs_flag_fails_naming_it(tmp_path, flags, message):
  result = run_cli("--flagfile=configs/smoke.cfg", f"--workdir={tmp_path}",
                   "--mode=predict", *flags, timeout=120)
  assert result.returncode == 2
  assert message in result.stderr
  assert "Traceback" not in result.stderr


def test_an_image_above_the_exports_pixel_limit_is_refused(tiny_export,
                                                           tmp_path,
                                                           monkeypatch):
  model, root = tiny_export
  version = export.latest_version_path(root)
  assert export.read_metadata(version)["max_image_pixels"] == 89478485
  huge = image_cases.with_size(image_cases.header_cases()["rgb.png"],
                               23000, 23000)
  reason = ("image too large to decode: 23000 x 23000 pixels (529.0 "
            "megapixels) is above the limit of 89478485 pixels (89.5 "
            "megapixels) set by --max_image_pixels")
  serve = tf.saved_model.load(version).signatures["serving_default"]
  with pytest.raises(tf.errors.InvalidArgumentError) as error:
    serve(image_bytes=tf.constant([huge]))
  assert decode.too_large_reason(error.value) == reason
  good = write_inputs(str(tmp_path / "in"), make_images(1, seed=6))
  (tmp_path / "in" / "huge.png").write_bytes(huge)
  # The export's limit applies, whatever --max_image_pixels says now: both
  # in the up-front check and, for a file it missed, in the served graph.
  config = dataclasses.replace(
      predict_config(tmp_path, str(tmp_path / "in"), root),
      max_image_pixels=0)
  for check in (file_check.find_undecodable, lambda paths, **unused: {}):
    monkeypatch.setattr(file_check, "find_undecodable", check)
    result = predict.run_prediction(config)
    check_predictions(result, model, good)
    skipped = {os.path.basename(s["path"]): s["reason"]
               for s in result["skipped_files"]}
    assert skipped["huge.png"] == reason

"""Tests for tf_finetune.export: export, reload, serve, compare (TF Model
Garden style), plus the signature contract and atomic versioning."""

import hashlib
import io
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_finetune import decode
from tf_finetune import export

SIZE = 32
CLASS_NAMES = ("daisy", "rose", "tulip", "sunflower")
ATOL = 1e-5


def build_tiny_model(num_classes=len(CLASS_NAMES)):
  """Same input/output contract as model.py: uint8 images -> softmax."""
  keras.utils.set_random_seed(0)
  images = keras.Input((SIZE, SIZE, 3), dtype="uint8")
  x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(images)
  x = keras.layers.Conv2D(8, 3, activation="relu")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  probabilities = keras.layers.Dense(num_classes, activation="softmax")(x)
  return keras.Model(images, probabilities)


def make_images(count=3, height=SIZE, width=SIZE, seed=0):
  # Smooth gradients plus noise: random enough that classes differ, and
  # JPEG-friendly enough that decoding stays close to the source.
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0, 200, width)[None, :, None]
  noise = rng.integers(0, 56, (count, height, width, 3))
  return (ramp + noise).astype(np.uint8)


def encode_bmp(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="BMP")
  return buffer.getvalue()


def to_numpy(outputs):
  return {name: value.numpy() for name, value in outputs.items()}


@pytest.fixture(scope="module")
def model():
  return build_tiny_model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
  """One export shared by the read-only tests: (version path, loaded)."""
  root = str(tmp_path_factory.mktemp("export"))
  path = export.export_saved_model(model, CLASS_NAMES, SIZE, root)
  return path, tf.saved_model.load(path)


def serve_bytes(loaded, encoded):
  return to_numpy(loaded.signatures["serving_default"](
      image_bytes=tf.constant(encoded)))


def assert_matches_model(outputs, model, pixels):
  expected = model(pixels).numpy()
  np.testing.assert_allclose(outputs["probabilities"], expected, atol=ATOL)
  names = np.array(CLASS_NAMES)[np.argmax(expected, axis=-1)]
  assert [c.decode() for c in outputs["classes"][:, 0]] == list(names)


def test_serving_default_png_and_bmp_match_model(model, exported):
  _, loaded = exported
  images = make_images()
  # Lossless formats at the model's size: decode+resize gives the pixels back.
  for encode in (lambda i: tf.io.encode_png(i).numpy(), encode_bmp):
    outputs = serve_bytes(loaded, [encode(image) for image in images])
    assert_matches_model(outputs, model, images)


def test_serving_default_jpeg_matches_model_on_decoded_pixels(model, exported):
  _, loaded = exported
  encoded = [tf.io.encode_jpeg(image, quality=90).numpy()
             for image in make_images()]
  decoded = np.stack([tf.io.decode_jpeg(e, channels=3).numpy()
                      for e in encoded])
  assert_matches_model(serve_bytes(loaded, encoded), model, decoded)


def test_serving_default_resizes_like_the_input_pipeline(model, exported):
  _, loaded = exported
  encoded = [tf.io.encode_png(image).numpy()
             for image in make_images(2, height=45, width=61)]
  # decode_and_resize run eagerly here and in the serving graph there.
  pixels = np.stack([decode.decode_and_resize(e, SIZE).numpy()
                     for e in encoded])
  assert_matches_model(serve_bytes(loaded, encoded), model, pixels)


def test_serving_tensor_matches_model(model, exported):
  _, loaded = exported
  images = make_images(5, seed=1)
  outputs = to_numpy(loaded.signatures["serving_tensor"](
      images=tf.constant(images)))
  assert_matches_model(outputs, model, images)


def test_empty_batch_gives_empty_outputs(exported):
  _, loaded = exported
  k = len(CLASS_NAMES)
  for outputs in (
      serve_bytes(loaded, tf.constant([], tf.string)),
      to_numpy(loaded.signatures["serving_tensor"](
          images=tf.zeros([0, SIZE, SIZE, 3], tf.uint8)))):
    assert {name: value.shape for name, value in outputs.items()} == {
        "probabilities": (0, len(CLASS_NAMES)), "classes": (0, k),
        "scores": (0, k)}


def test_scores_are_top_k_of_probabilities(exported):
  _, loaded = exported
  outputs = to_numpy(loaded.signatures["serving_tensor"](
      images=tf.constant(make_images(4, seed=2))))
  scores, probabilities = outputs["scores"], outputs["probabilities"]
  # top_k=5 > 4 classes: K is capped at C.
  assert scores.shape == (4, len(CLASS_NAMES))
  assert np.all(np.diff(scores, axis=-1) <= 0)
  np.testing.assert_allclose(scores, -np.sort(-probabilities, axis=-1),
                             atol=ATOL)
  names = np.array(CLASS_NAMES, dtype=object)
  for row, classes in enumerate(outputs["classes"]):
    indices = [CLASS_NAMES.index(c.decode()) for c in classes]
    np.testing.assert_allclose(probabilities[row, indices], scores[row],
                               atol=ATOL)
    assert len(set(names[indices])) == len(indices)


def test_top_k_smaller_than_class_count(model, tmp_path):
  path = export.export_saved_model(model, CLASS_NAMES, SIZE, str(tmp_path),
                                   top_k=2)
  loaded = tf.saved_model.load(path)
  outputs = to_numpy(loaded.signatures["serving_tensor"](
      images=tf.constant(make_images(3))))
  assert outputs["classes"].shape == (3, 2)
  assert outputs["scores"].shape == (3, 2)
  assert outputs["probabilities"].shape == (3, len(CLASS_NAMES))
  assert export.read_metadata(path)["top_k"] == 2


def test_signatures_follow_the_contract(exported):
  _, loaded = exported
  signatures = loaded.signatures
  assert set(signatures) == {"serving_default", "serving_tensor"}
  expected_inputs = {
      "serving_default": {"image_bytes": ([None], tf.string)},
      "serving_tensor": {"images": ([None, SIZE, SIZE, 3], tf.uint8)},
  }
  num_classes, k = len(CLASS_NAMES), min(5, len(CLASS_NAMES))
  expected_outputs = {
      "probabilities": ([None, num_classes], tf.float32),
      "classes": ([None, k], tf.string),
      "scores": ([None, k], tf.float32),
  }
  for name, inputs in expected_inputs.items():
    args, kwargs = signatures[name].structured_input_signature
    assert args == ()
    assert {key: (spec.shape.as_list(), spec.dtype)
            for key, spec in kwargs.items()} == inputs
    assert {key: (spec.shape.as_list(), spec.dtype)
            for key, spec in signatures[name].structured_outputs.items()
           } == expected_outputs


def test_assets_are_inside_the_version_folder(exported):
  path, _ = exported
  assert os.path.isfile(os.path.join(path, "assets", "class_names.txt"))
  assert export.read_class_names(path) == list(CLASS_NAMES)
  assert export.read_metadata(path) == {
      "image_size": SIZE, "top_k": len(CLASS_NAMES),
      "num_classes": len(CLASS_NAMES), "max_image_pixels": 89478485}


def test_class_names_live_in_the_graph(exported, tmp_path):
  path, _ = exported
  copy = str(tmp_path / "1")
  shutil.copytree(path, copy)
  shutil.rmtree(os.path.join(copy, "assets"))
  loaded = tf.saved_model.load(copy)
  outputs = to_numpy(loaded.signatures["serving_tensor"](
      images=tf.constant(make_images(2))))
  assert {c.decode() for c in outputs["classes"].ravel()} <= set(CLASS_NAMES)


def snapshot(folder):
  """{relative path: (mtime_ns, sha256)} of every file under folder."""
  result = {}
  for parent, _, files in os.walk(folder):
    for name in files:
      file_path = os.path.join(parent, name)
      with open(file_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      result[os.path.relpath(file_path, folder)] = (
          os.stat(file_path).st_mtime_ns, digest)
  return result


def test_versions_increment_and_leave_earlier_untouched(model, tmp_path):
  root = str(tmp_path)
  first = export.export_saved_model(model, CLASS_NAMES, SIZE, root)
  before = snapshot(first)
  second = export.export_saved_model(model, CLASS_NAMES, SIZE, root)
  assert (first, second) == (os.path.join(root, "1"), os.path.join(root, "2"))
  assert snapshot(first) == before
  assert sorted(os.listdir(root)) == ["1", "2"]
  assert export.latest_version_path(root) == second


def test_leftover_temp_folder_is_not_a_version(model, tmp_path):
  root = str(tmp_path)
  os.makedirs(os.path.join(root, "3"))
  os.makedirs(os.path.join(root, ".tmp-7-crashed"))  # An earlier crash.
  assert export.list_versions(root) == [3]
  path = export.export_saved_model(model, CLASS_NAMES, SIZE, root)
  assert path == os.path.join(root, "4")


def test_crash_during_export_leaves_no_trace(model, tmp_path, monkeypatch):
  root = str(tmp_path)
  first = export.export_saved_model(model, CLASS_NAMES, SIZE, root)
  before = snapshot(first)

  def crash_after_saved_model(version_dir, *args):
    # The SavedModel itself is already on disk when this runs.
    assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    raise OSError("disk full")

  monkeypatch.setattr(export, "_write_assets", crash_after_saved_model)
  with pytest.raises(OSError, match="disk full"):
    export.export_saved_model(model, CLASS_NAMES, SIZE, root)
  assert os.listdir(root) == ["1"]
  assert snapshot(first) == before


def test_rejects_class_names_that_do_not_fit_the_model(model, tmp_path):
  root = str(tmp_path / "export")
  with pytest.raises(ValueError, match="3 class names"):
    export.export_saved_model(model, CLASS_NAMES[:3], SIZE, root)
  with pytest.raises(ValueError, match="duplicates"):
    export.export_saved_model(model, ("a", "b", "a", "c"), SIZE, root)
  assert not os.path.exists(root)


def test_a_run_exports_its_model_once(model, tmp_path):
  """A run killed between its export and its report exports nothing more
  when rerun: the rerun passes the same run id and gets its version back."""
  root = str(tmp_path)
  first = export.export_saved_model(model, CLASS_NAMES, SIZE, root,
                                    run_id="run-a")
  before = snapshot(first)
  again = export.export_saved_model(model, CLASS_NAMES, SIZE, root,
                                    run_id="run-a")
  assert again == first and export.list_versions(root) == [1]
  assert snapshot(first) == before
  assert export.read_run_id(first) == "run-a"
  # Another run, the same run with another --top_k, or no run id (mode
  # export) each get a version of their own.
  other = export.export_saved_model(model, CLASS_NAMES, SIZE, root,
                                    run_id="run-b")
  fewer = export.export_saved_model(model, CLASS_NAMES, SIZE, root, top_k=2,
                                    run_id="run-a")
  plain = export.export_saved_model(model, CLASS_NAMES, SIZE, root)
  assert [other, fewer, plain] == [os.path.join(root, v) for v in "234"]
  assert export.read_run_id(plain) is None
  # The newest version of a run is the one it gets back.
  assert export.export_saved_model(model, CLASS_NAMES, SIZE, root, top_k=2,
                                   run_id="run-a") == fewer


def test_export_to_a_gfile_file_system(model):
  """An export root on another file system than the local disk (here
  TensorFlow's in-memory ram://, as gs:// would be) gets whole versions."""
  root = "ram://test-export-" + os.urandom(8).hex()
  try:
    path = export.export_saved_model(model, CLASS_NAMES, SIZE, root,
                                     run_id="run-a")
    assert path == root + "/1"
    assert export.read_class_names(path) == list(CLASS_NAMES)
    assert export.read_run_id(path) == "run-a"
    assert [name for name in tf.io.gfile.listdir(root)] == ["1"]
    images = make_images(2)
    served = to_numpy(tf.saved_model.load(path).signatures["serving_tensor"](
        images=tf.constant(images)))
    assert_matches_model(served, model, images)
    assert export.export_saved_model(model, CLASS_NAMES, SIZE, root,
                                     run_id="run-a") == path
  finally:
    tf.io.gfile.rmtree(root)

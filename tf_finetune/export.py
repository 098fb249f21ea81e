"""Export: a versioned SavedModel that TF Serving serves as is.

Design notes: ARCHITECTURE.md, "Module notes", `export.py`.
"""

import json
import os
from typing import Dict, List, Optional, Sequence

import keras
import tensorflow as tf
from absl import logging

from tf_finetune import decode, files, litert, saved_models
from tf_finetune.config import DEFAULT_MAX_IMAGE_PIXELS, Config

CLASS_NAMES_FILE = "class_names.txt"
METADATA_FILE = "metadata.json"
RUN_ID_FILE = "run_id.txt"
# Another writer may take the chosen version number between listing and
# renaming; we then move on to the next number, a few times at most.
_RENAME_ATTEMPTS = 5


def export_saved_model(model: keras.Model, class_names: Sequence[str],
                       image_size: int, export_root: str,
                       top_k: int = 5, run_id: Optional[str] = None,
                       formats: Sequence[str] = ("saved_model",),
                       max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                       ) -> str:
  """Writes a new version `export_root/<N>/`, unless run `run_id` exported
  one already, and returns its path.

  N is one more than the highest existing integer version (1 if none).
  Nothing partial is ever visible: on any error the temporary folder is
  removed, the error re-raised, and existing versions are left untouched.

  Args:
    model: maps uint8 images [None, S, S, 3] to float probabilities
      [None, C]; preprocessing is inside it.
    class_names: the C class names, in the model's output order.
    image_size: S, the side the model expects; encoded images are resized
      to it in the serving graph.
    export_root: folder holding the versions; created if missing.
    top_k: number of classes in `classes` and `scores` (capped at C).
    run_id: the training run this model ends (checkpoints.read_run_id). If
      a version of `export_root` was exported by that run with the same
      top K, its path is returned and nothing is written; None: always a
      new version (`--mode=export`).
    formats: "saved_model" (always written: the version is a SavedModel)
      and optionally "tflite", LiteRT models in `<N>/tflite/`; a version
      run `run_id` exported without them gets them added.
    max_image_pixels: `serving_default` refuses images whose header says
      more pixels, before decoding them; 0: no limit.

  Returns:
    The path of the version folder.
  """
  class_names = [str(name) for name in class_names]
  _check_arguments(model, class_names, image_size, top_k)
  if max_image_pixels < 0:
    raise ValueError(f"max_image_pixels={max_image_pixels} must be >= 0.")
  k = min(top_k, len(class_names))
  if run_id:
    existing = find_version_of_run(export_root, run_id, k)
    if existing is not None:
      logging.info("%s was exported by this run already; not exporting "
                   "again.", existing)
      if "tflite" in formats and not litert.has_tflite_models(existing):
        add_tflite_models(existing, model, class_names, image_size)
      return existing
  files.makedirs(export_root)
  with files.temp_folder(export_root) as temp_dir:
    archive = build_export_archive(model, class_names, image_size, top_k,
                                   max_image_pixels)
    archive.write_out(temp_dir, verbose=False)
    _write_assets(temp_dir, class_names, image_size, k, run_id,
                  max_image_pixels)
    if "tflite" in formats:
      litert.write_tflite_models(model, class_names, image_size,
                                 litert.tflite_folder(temp_dir))
    return _move_into_place(temp_dir, export_root)


def add_tflite_models(version_path: str, model: keras.Model,
                      class_names: Sequence[str], image_size: int) -> str:
  """Writes `<version_path>/tflite/` beside an existing SavedModel, whole or
  not at all (a half-written folder left by a kill is replaced); returns
  its path."""
  target = litert.tflite_folder(version_path)
  with files.temp_folder(version_path) as temp_dir:
    litert.write_tflite_models(model, [str(name) for name in class_names],
                               image_size, temp_dir)
    if files.exists(target):
      files.remove_tree(target)
    files.move_folder_into_place(temp_dir, target)
  return target


def find_version_of_run(export_root: str, run_id: str,
                        top_k: int) -> Optional[str]:
  """The newest version under `export_root` that run `run_id` exported with
  `top_k` classes per answer, or None."""
  for version in reversed(list_versions(export_root)):
    path = os.path.join(export_root, str(version))
    if (read_run_id(path) == run_id
        and read_metadata(path).get("top_k") == top_k):
      return path
  return None


def build_export_archive(model: keras.Model, class_names: Sequence[str],
                         image_size: int, top_k: int = 5,
                         max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                         ) -> keras.export.ExportArchive:
  """Returns an ExportArchive with the two serving signatures, not written.

  ExportArchive, not `tf.saved_model.save(model)`: the latter loses the
  signature, input and output names of a Keras 3 model
  (keras-team/keras#19458; ARCHITECTURE.md).
  """
  predict = _make_predict_fn(model, class_names, top_k)

  def serve_image_bytes(image_bytes):
    images = tf.map_fn(
        lambda one: decode.decode_and_resize(one, image_size,
                                           max_image_pixels), image_bytes,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3],
                                          tf.uint8))
    return predict(images)

  def serve_images(images):
    return predict(images)

  archive = keras.export.ExportArchive()
  archive.track(model)
  # The first endpoint also becomes "serving_default"; naming it so
  # explicitly keeps the signature list to exactly the two of the contract.
  archive.add_endpoint(
      "serving_default", serve_image_bytes,
      input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  archive.add_endpoint(
      "serving_tensor", serve_images,
      input_signature=[tf.TensorSpec([None, image_size, image_size, 3],
                                     tf.uint8, name="images")])
  return archive


def next_version(export_root: str) -> int:
  """Returns 1 + the highest integer version under `export_root` (1 if none)."""
  return max(list_versions(export_root), default=0) + 1


def list_versions(export_root: str) -> List[int]:
  """Returns the integer versions under `export_root`, ascending.

  Only all-digit names count, as in TF Serving: temporary folders
  (`.tmp-...`) and stray files such as `README` are not versions.
  """
  if not files.isdir(export_root):
    return []
  return sorted(int(name) for name in files.listdir(export_root)
                if name.isdigit())


def latest_version_path(export_root: str) -> str:
  """Returns the path of the highest version; FileNotFoundError if none."""
  versions = list_versions(export_root)
  if not versions:
    raise FileNotFoundError(f"No exported model version in {export_root}.")
  return os.path.join(export_root, str(versions[-1]))


def load_serving(path: str):
  """Loads an exported version for in-process serving (e.g. a predict mode).

  Returns the loaded SavedModel object; call
  `loaded.signatures["serving_default"](image_bytes=...)`. Keep the object
  itself alive while using a signature: the signatures do not own the
  variables, which are freed with it.
  """
  return tf.saved_model.load(path)


def read_class_names(path: str) -> List[str]:
  """Returns the class names stored in the assets of an exported version."""
  return files.read_text(
      os.path.join(path, "assets", CLASS_NAMES_FILE)).splitlines()


def read_metadata(path: str) -> Dict[str, int]:
  """Returns {"image_size", "top_k", "num_classes", "max_image_pixels"} of an
  exported version (versions exported before the pixel limit have no
  "max_image_pixels": they decode any size)."""
  return files.read_json(os.path.join(path, "assets", METADATA_FILE))


def read_run_id(path: str) -> Optional[str]:
  """The id of the training run that exported version `path`, if recorded."""
  marker = os.path.join(path, "assets", RUN_ID_FILE)
  return files.read_text(marker).strip() if files.exists(marker) else None


def _make_predict_fn(model, class_names, top_k):
  """Returns images -> {probabilities, classes, scores}, for both signatures."""
  k = min(top_k, len(class_names))

  def predict(images):
    # Workaround: with oneDNN (TF 2.21's default on x86 CPUs) Conv2D returns
    # an empty batch unchanged ([0, 32, 32, 3] -> [0, 32, 32, 3]), so the
    # model fails on it ("Matrix size-incompatible" in the head). An empty
    # request is padded with one blank image whose answer is sliced off; a
    # non-empty one gets no padding. (A tf.cond would also do, but it makes
    # the SavedModel writer log hundreds of renamed captured inputs.)
    count = tf.shape(images)[0]
    padding = tf.zeros(tf.concat([[tf.maximum(1 - count, 0)],
                                  tf.shape(images)[1:]], 0), images.dtype)
    padded = tf.concat([images, padding], 0)
    # float32 whatever the model's dtype policy (mixed precision), as the
    # contract says.
    probabilities = tf.cast(model(padded, training=False), tf.float32)[:count]
    scores, indices = tf.math.top_k(probabilities, k=k)
    # Created inside the traced function, so the names are a Const node of
    # the serving graph rather than a captured eager tensor.
    names = tf.constant(class_names, dtype=tf.string)
    return {"probabilities": probabilities,
            "classes": tf.gather(names, indices),
            "scores": scores}

  return predict


def _check_arguments(model, class_names, image_size, top_k):
  """Raises ValueError on arguments that would export a wrong model."""
  if not class_names:
    raise ValueError("class_names is empty.")
  if len(set(class_names)) != len(class_names):
    raise ValueError(f"class_names has duplicates: {class_names}.")
  if any("\n" in name or "\r" in name for name in class_names):
    raise ValueError("class names must not contain line breaks "
                     f"(one name per line in {CLASS_NAMES_FILE}).")
  if image_size < 1 or top_k < 1:
    raise ValueError(
        f"image_size={image_size} and top_k={top_k} must both be >= 1.")
  try:
    num_outputs = model.output_shape[-1]
  except (AttributeError, ValueError):
    return  # A subclassed model has no static output shape to check.
  if num_outputs != len(class_names):
    raise ValueError(f"The model has {num_outputs} outputs but there are "
                     f"{len(class_names)} class names.")


def _write_assets(version_dir, class_names, image_size, top_k, run_id,
                  max_image_pixels):
  """Writes the class names (one per line), serving metadata and run id."""
  assets_dir = os.path.join(version_dir, "assets")
  files.makedirs(assets_dir)
  files.write_bytes(os.path.join(assets_dir, CLASS_NAMES_FILE),
                    "".join(f"{name}\n" for name in class_names).encode())
  metadata = {"image_size": image_size, "top_k": top_k,
              "num_classes": len(class_names),
              "max_image_pixels": max_image_pixels}
  files.write_bytes(os.path.join(assets_dir, METADATA_FILE),
                    json.dumps(metadata, indent=2).encode())
  if run_id:
    files.write_bytes(os.path.join(assets_dir, RUN_ID_FILE),
                      f"{run_id}\n".encode())


def _move_into_place(temp_dir: str, export_root: str) -> str:
  """Moves `temp_dir` to the next free version; returns the final path.

  An existing version is never replaced: when another writer takes the
  number between listing and moving, the next number is tried.
  """
  error: Optional[FileExistsError] = None
  for _ in range(_RENAME_ATTEMPTS):
    target = os.path.join(export_root, str(next_version(export_root)))
    try:
      files.move_folder_into_place(temp_dir, target)
      return target
    except FileExistsError as e:
      error = e
  raise RuntimeError(
      f"Could not claim a version number in {export_root}.") from error


def run_export(config: Config) -> str:
  """`--mode=export`: re-exports WORKDIR/model.keras as a new version."""
  model = saved_models.load_trained_model(config.workdir)
  image_size = model.input_shape[1]  # The trained size, whatever the flag says.
  path = export_saved_model(
      model, saved_models.read_class_names(config.workdir), image_size,
      config.resolved_export_dir, config.top_k, formats=config.export_formats,
      max_image_pixels=config.max_image_pixels)
  logging.info("Export: %s", path)
  return path

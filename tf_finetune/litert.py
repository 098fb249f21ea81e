"""LiteRT (TensorFlow Lite) models for phones and devices, and running them.

Design notes: ARCHITECTURE.md, "Module notes", `litert.py`.
"""

import json
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Sequence

import numpy as np

from tf_finetune import files
from tf_finetune.config import UserError

TFLITE_DIR = "tflite"
FLOAT_FILE = "model.tflite"
INT8_FILE = "model_int8.tflite"
LABELS_FILE = "labels.txt"
METADATA_FILE = "metadata.json"
# --runtime value -> model file in TFLITE_DIR.
RUNTIME_FILES = {"tflite": FLOAT_FILE, "tflite_int8": INT8_FILE}
INSTALL_HINT = "pip install ai-edge-litert (or pip install 'tf_finetune[litert]')"
# The name of the converted model's one signature, input and output.
SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


def write_tflite_models(model, class_names: Sequence[str], image_size: int,
                        folder: str) -> Dict[str, int]:
  """Converts `model` to float32 and int8 .tflite files in `folder`.

  Args:
    model: maps uint8 images [None, S, S, 3] to probabilities [None, C].
    class_names: the C class names, in output order (labels.txt).
    image_size: S.
    folder: created if missing; gets the four files of ARCHITECTURE.md's
      "Module notes", `litert.py`.

  Returns:
    {file name: size in bytes} of the two models.
  """
  files.makedirs(folder)
  sizes = {}
  with tempfile.TemporaryDirectory(prefix="tflite-saved-model-") as staging:
    _write_conversion_source(model, image_size, staging)
    for name, quantize in ((FLOAT_FILE, False), (INT8_FILE, True)):
      flatbuffer = convert_saved_model(staging, quantize)
      files.write_bytes(os.path.join(folder, name), flatbuffer)
      sizes[name] = len(flatbuffer)
  files.write_bytes(os.path.join(folder, LABELS_FILE),
                    "".join(f"{name}\n" for name in class_names).encode())
  metadata = {"image_size": image_size, "num_classes": len(class_names),
              "input": f"{INPUT_NAME}: uint8 [N, {image_size}, "
                       f"{image_size}, 3], RGB",
              "output": f"{OUTPUT_NAME}: float32 [N, {len(class_names)}]",
              "models": {FLOAT_FILE: "float32 weights",
                         INT8_FILE: "int8 weights, dynamic-range quantised"}}
  files.write_bytes(os.path.join(folder, METADATA_FILE),
                    json.dumps(metadata, indent=2).encode())
  return sizes


def _write_conversion_source(model, image_size: int, folder: str) -> None:
  """A SavedModel whose one signature is images -> {"probabilities"}.

  Not the exported version itself: its signatures also return the class
  names as strings and take encoded bytes, which builtin LiteRT ops do not
  cover.
  """
  import keras  # Heavy: only when converting.
  import tensorflow as tf

  def probabilities(images):
    # float32 whatever the model's dtype policy, as in the SavedModel.
    return {OUTPUT_NAME: tf.cast(model(images, training=False), tf.float32)}

  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(
      SIGNATURE, probabilities,
      input_signature=[tf.TensorSpec([None, image_size, image_size, 3],
                                     tf.uint8, name=INPUT_NAME)])
  archive.write_out(folder, verbose=False)


def convert_saved_model(saved_model_dir: str, quantize: bool) -> bytes:
  """The .tflite flatbuffer of a local SavedModel; int8 weights if `quantize`."""
  import tensorflow as tf  # Heavy: only when converting.
  converter = tf.lite.TFLiteConverter.from_saved_model(
      saved_model_dir, signature_keys=[SIGNATURE])
  # Builtin ops only: a model needing TensorFlow (Flex) ops would fail on a
  # phone whose app links the plain LiteRT runtime, so fail here instead.
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if quantize:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  return converter.convert()


def tflite_folder(version_path: str) -> str:
  return os.path.join(version_path, TFLITE_DIR)


def has_tflite_models(version_path: str) -> bool:
  folder = tflite_folder(version_path)
  return all(files.isfile(os.path.join(folder, name))
             for name in (FLOAT_FILE, INT8_FILE, LABELS_FILE))


def read_labels(version_path: str) -> List[str]:
  return files.read_text(
      os.path.join(tflite_folder(version_path), LABELS_FILE)).splitlines()


def model_path(version_path: str, runtime: str) -> str:
  """The .tflite file of `runtime` ('tflite' or 'tflite_int8') in a version,
  or UserError when the version has none."""
  if not has_tflite_models(version_path):
    raise UserError(
        f"--runtime={runtime}: {version_path} has no {TFLITE_DIR}/ folder "
        "with LiteRT models; write one with --mode=export "
        "--export_formats=saved_model,tflite.")
  return os.path.join(tflite_folder(version_path), RUNTIME_FILES[runtime])


def _interpreter_class():
  """LiteRT's Interpreter, or UserError naming the pip command."""
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:
    raise UserError("Running a .tflite model needs the LiteRT runtime, "
                    f"which is not installed: {INSTALL_HINT}.") from None
  return Interpreter


class TFLiteClassifier:
  """A .tflite classifier: uint8 images [N, S, S, 3] -> probabilities [N, C].

  Runs LiteRT's interpreter on as many threads as this process may use,
  as TensorFlow does, so that latencies compare like with like.
  """

  def __init__(self, path: str):
    interpreter_class = _interpreter_class()
    self.path = path
    content = files.read_bytes(path)  # Through files.py: any store.
    self.size_bytes = len(content)
    self._interpreter = interpreter_class(
        model_content=content, num_threads=len(os.sched_getaffinity(0)))
    self._input = self._interpreter.get_input_details()[0]
    self._output = self._interpreter.get_output_details()[0]
    self._batch = None

  @property
  def image_size(self) -> int:
    return int(self._input["shape"][1])

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != tuple(
        self._input["shape"][1:]):
      raise ValueError(
          f"{self.path} takes uint8 [N, {self.image_size}, {self.image_size},"
          f" 3]; got {images.dtype} {list(images.shape)}.")
    if len(images) != self._batch:
      # Reallocating costs little next to a ResNet50; only on a new size.
      self._interpreter.resize_tensor_input(self._input["index"],
                                            list(images.shape))
      self._interpreter.allocate_tensors()
      self._batch = len(images)
    self._interpreter.set_tensor(self._input["index"], images)
    self._interpreter.invoke()
    # A copy: the interpreter reuses its output buffer at the next call.
    return np.array(self._interpreter.get_tensor(self._output["index"]))


def median_latency_ms(predict: Callable[[np.ndarray], object],
                      image: np.ndarray, runs: int, warmup: int = 3) -> float:
  """Median wall time in milliseconds of `predict` on one image [1, S, S, 3],
  over `runs` calls after `warmup` untimed ones."""
  for _ in range(warmup):
    predict(image)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    predict(image)
    times.append(time.perf_counter() - start)
  return 1000.0 * statistics.median(times)


def compare(reference: np.ndarray, float_model: np.ndarray,
            int8_model: np.ndarray) -> Dict[str, float]:
  """How closely the LiteRT models' probabilities [N, C] follow the
  reference's (the SavedModel's) on the same images.

  Returns:
    {"float_max_abs_difference": largest |p_float - p_ref| over all images
    and classes, "float_top1_agreement": share of images with the same most
    probable class, "int8_max_abs_difference", "int8_top1_agreement"}.
  """
  reference_top1 = reference.argmax(axis=-1)
  result = {}
  for name, probabilities in (("float", float_model), ("int8", int8_model)):
    result[f"{name}_max_abs_difference"] = float(
        np.max(np.abs(probabilities - reference)))
    result[f"{name}_top1_agreement"] = float(
        np.mean(probabilities.argmax(axis=-1) == reference_top1))
  return result

"""Prediction (`--mode=predict`): image files through the exported model.

Design notes: ARCHITECTURE.md, "Module notes", `predict.py`.
"""

import os
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from tf_finetune import decode, export, file_check, files, folder_source, litert
from tf_finetune.config import Config, UserError

PREDICTIONS_FILE = "predictions.json"


def run_prediction(config: Config) -> Dict:
  """`--mode=predict`: classifies `config.inputs`, writes predictions.json.

  Returns:
    The content of predictions.json: {"export_path", "inputs",
    "predictions": [{"file", "classes", "scores"}], "skipped_files":
    [{"path", "reason", "file"}]}. `classes` and `scores` are the export's
    top K, most probable first. A skipped file's "path" is report.json's
    key; "file", the same path, is deprecated (README.md).

  Raises:
    UserError: `--inputs` has no image files, or there is no exported model.
  """
  paths = list_inputs(config.inputs)
  version_path = find_latest_export(config.resolved_export_dir)
  if config.runtime == "tensorflow":
    # The loaded object owns the variables: keep it alive while serving.
    loaded = export.load_serving(version_path)
    serve = loaded.signatures["serving_default"]
    model_path = version_path
  else:
    model_path = litert.model_path(version_path, config.runtime)
    # The version's top K, so that only the runtime differs from the
    # SavedModel's answers.
    serve = tflite_serving_function(
        litert.TFLiteClassifier(model_path), litert.read_labels(version_path),
        export.read_metadata(version_path)["top_k"])
  # Checked with the decoder and the pixel limit the serving graph runs
  # (decode.decode_and_resize), so one bad file does not fail the batch it
  # would be in, and an oversized one is not decoded here either.
  skipped = file_check.find_undecodable(
      paths, max_pixels=served_pixel_limit(version_path, config))
  usable = [path for path in paths if path not in skipped]
  predictions, failed = classify_files(serve, usable, config.batch_size)
  skipped.update(failed)
  result = {
      "export_path": model_path,
      "inputs": config.inputs,
      "predictions": predictions,
      # "file": deprecated duplicate of "path", kept for readers of the
      # older key until the next release (README.md).
      "skipped_files": [{"path": path, "reason": skipped[path], "file": path}
                        for path in paths if path in skipped],
  }
  files.write_json_atomic(os.path.join(config.workdir, PREDICTIONS_FILE),
                          result)
  logging.info("Predicted %d files with %s (%d skipped).", len(predictions),
               model_path, len(skipped))
  return result


def list_inputs(inputs: str) -> List[str]:
  """The image files to classify: `inputs` itself, or those under it.

  A folder is walked recursively, in sorted order, taking the files with an
  image extension (as the `folder:` source does) and leaving hidden entries
  out. A single file is taken whatever its name.
  """
  if os.path.isfile(inputs):
    return [inputs]
  if not os.path.isdir(inputs):
    raise UserError(f"--inputs={inputs!r}: no such file or folder.")
  paths = []
  for parent, dirs, names in os.walk(inputs):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    paths.extend(os.path.join(parent, name) for name in sorted(names)
                 if not name.startswith(".")
                 and name.lower().endswith(folder_source.IMAGE_EXTENSIONS))
  if not paths:
    raise UserError(
        f"--inputs={inputs!r}: no image files in this folder; expected "
        f"files ending in {', '.join(folder_source.IMAGE_EXTENSIONS)}.")
  return paths


def find_latest_export(export_root: str) -> str:
  """The highest version under `export_root`, as TF Serving would load."""
  try:
    return export.latest_version_path(export_root)
  except FileNotFoundError:
    raise UserError(
        f"--export_dir={export_root!r}: no exported model version there; "
        "train first (--mode=train) or export one (--mode=export).") from None


def served_pixel_limit(version_path: str, config: Config) -> int:
  """The pixel limit export `version_path` serves with; for a version
  exported before exports recorded one, `--max_image_pixels`."""
  return export.read_metadata(version_path).get("max_image_pixels",
                                                config.max_image_pixels)


def classify_files(serve, paths: Sequence[str], batch_size: int
                   ) -> Tuple[List[Dict], Dict[str, str]]:
  """Runs the files through `serve` (a serving_default signature) in batches.

  A batch that fails is retried file by file, so a file the up-front check
  let through (e.g. changed since) costs only itself.

  Returns:
    (predictions [{"file", "classes", "scores"}] in `paths` order,
    {file: reason} for the files that failed).
  """
  predictions, failed = [], {}
  for start in range(0, len(paths), batch_size):
    batch = list(paths[start:start + batch_size])
    try:
      predictions.extend(_serve_files(serve, batch))
    except (OSError, tf.errors.OpError):
      for path in batch:
        try:
          predictions.extend(_serve_files(serve, [path]))
        except (OSError, tf.errors.OpError) as error:
          failed[path] = _describe_error(error)
  return predictions, failed


def tflite_serving_function(classifier: litert.TFLiteClassifier,
                            class_names: Sequence[str], top_k: int):
  """A LiteRT model called as the export's serving_default is:
  image_bytes -> {"classes", "scores"}, the top K.

  Decoding and resizing are the serving graph's (`decode.decode_and_resize`),
  run by TensorFlow here as a phone app would run its own decoder.
  """
  names = tf.constant(list(class_names), dtype=tf.string)
  k = min(top_k, len(class_names))

  def serve(image_bytes):
    images = np.stack([
        decode.decode_and_resize(one, classifier.image_size).numpy()
        for one in tf.unstack(image_bytes)])
    scores, indices = tf.math.top_k(classifier(images), k=k)
    return {"classes": tf.gather(names, indices), "scores": scores}

  return serve


def _serve_files(serve, paths: Sequence[str]) -> List[Dict]:
  encoded = []
  for path in paths:
    with open(path, "rb") as f:
      encoded.append(f.read())
  outputs = serve(image_bytes=tf.constant(encoded, dtype=tf.string))
  classes = outputs["classes"].numpy()
  scores = outputs["scores"].numpy()
  return [{"file": path,
           "classes": [name.decode("utf-8") for name in classes[row]],
           "scores": [float(score) for score in scores[row]]}
          for row, path in enumerate(paths)]


def _describe_error(error: Exception) -> str:
  """One line: TF's message without its '{{function_node ...}}' noise."""
  if isinstance(error, OSError):
    return f"unreadable: {error.strerror or error}"
  too_large = decode.too_large_reason(error)
  if too_large:
    return too_large
  text = re.sub(r"\{\{.*?\}\}", "", error.message or "")
  text = re.sub(r"\[\[.*", "", text, flags=re.DOTALL)
  return "not a decodable image: " + (" ".join(text.split())
                                      or type(error).__name__)

"""The trained model file: WORKDIR/model.keras, saved atomically and loaded
with Keras safe_mode on, and the class names its run recorded."""

import os
from typing import Sequence

import keras

from tf_finetune import files, report
from tf_finetune.config import UserError, first_line

MODEL_FILE = "model.keras"


def save_model_atomic(model: keras.Model, path: str) -> None:
  """Saves to a temp `.keras` file, then moves it into place (files.py)."""
  with files.atomic_output(path) as temp:
    model.save(temp)


def load_trained_model(workdir: str) -> keras.Model:
  """Loads WORKDIR/model.keras with safe_mode on, or raises UserError."""
  path = os.path.join(workdir, MODEL_FILE)
  if not files.isfile(path):
    raise UserError(f"--workdir={workdir!r}: no {MODEL_FILE} there; train "
                    "first with --mode=train.")
  return load_model_safely(path)


def load_model_safely(path: str) -> keras.Model:
  """Loads a `.keras` file with safe_mode on, or raises UserError.

  safe_mode refuses to deserialize Python code (a Lambda layer's function):
  loading a model must never run code that came with the file.
  """
  try:
    return keras.models.load_model(path, safe_mode=True)
  except Exception as e:  # Keras raises ValueError/TypeError/OSError by case.
    message = str(e).strip()
    if "safe_mode" in message:
      raise UserError(
          f"{path}: refused, the model contains Python code (e.g. a Lambda "
          "layer) and models are loaded with Keras safe_mode on, which never "
          "runs code from a file. Retrain it with tf_finetune, or rebuild it "
          "from registered layers.") from e
    raise UserError(f"{path}: not a loadable Keras model ({type(e).__name__}: "
                    f"{first_line(e)}).") from e


def read_class_names(workdir: str) -> Sequence[str]:
  """Class names recorded by the training run's report.json."""
  path = os.path.join(workdir, report.REPORT_FILE)
  if not files.isfile(path):
    raise UserError(f"--workdir={workdir!r}: no {report.REPORT_FILE} with the "
                    "class names; train first with --mode=train.")
  return files.read_json(path)["class_names"]

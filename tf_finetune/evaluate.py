"""Evaluation (`--mode=evaluate`): the trained model on held-out data.

Design notes: ARCHITECTURE.md, "Module notes", `evaluate.py`.
"""

import os
from typing import Callable, Dict, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_finetune import (calibration, data, export, files, litert, plots,
                         predict, report, saved_models)
from tf_finetune.config import Config, UserError

EVALUATION_FILE = "evaluation.json"
# Top-5 accuracy is reported only above this many classes (at 5 or fewer it
# is always 1).
TOP_K = 5
# Single-image latency: the median of this many timed runs.
LATENCY_RUNS = 50
# Keras' epsilon: the same clipping as its cross-entropy.
_EPSILON = 1e-7


def run_evaluation(config: Config) -> Dict:
  """`--mode=evaluate`: metrics of WORKDIR/model.keras on test (else val).

  Returns:
    The content of evaluation.json.

  Raises:
    UserError: no trained model in the workdir, or `--dataset` has classes
      other than the ones the model was trained on.
  """
  if config.runtime != "tensorflow":
    return run_litert_evaluation(config)
  model = saved_models.load_trained_model(config.workdir)
  datasets = data.create_datasets(config)
  _check_classes(model, datasets.class_names, config.workdir)
  split = "test" if datasets.test is not None else "val"
  labels, probabilities = predict_dataset(model, getattr(datasets, split))
  return _write_evaluation(config, split, labels, probabilities,
                           datasets.class_names, {"runtime": "tensorflow"})


def run_litert_evaluation(config: Config) -> Dict:
  """`--mode=evaluate --runtime=tflite|tflite_int8`: the metrics of that
  LiteRT model of the latest export, and both LiteRT models beside the
  version's SavedModel on the same split.

  The comparison (evaluation.json's "litert"): the .tflite files' sizes;
  each model's top-1 agreement with the SavedModel and largest probability
  difference to it; the median single-image latency of the SavedModel and
  of each .tflite model.

  Raises:
    UserError: no export with LiteRT models, no LiteRT runtime installed,
      or `--dataset` has other classes than the export.
  """
  version_path = predict.find_latest_export(config.resolved_export_dir)
  models = {runtime: litert.TFLiteClassifier(
                litert.model_path(version_path, runtime))
            for runtime in litert.RUNTIME_FILES}
  class_names = litert.read_labels(version_path)
  datasets = data.create_datasets(config)
  if list(datasets.class_names) != class_names:
    raise UserError(
        f"--dataset: its classes {list(datasets.class_names)} differ from "
        f"the ones of the export {version_path!r}: {class_names}.")
  split = "test" if datasets.test is not None else "val"
  # The loaded object owns the variables: keep it alive while serving.
  loaded = export.load_serving(version_path)
  saved_model = _saved_model_probabilities(loaded)
  labels, outputs = predict_dataset_with(
      {"saved_model": saved_model, **models}, getattr(datasets, split))
  first_image = next(iter(getattr(datasets, split)))[0].numpy()[:1]
  latency = {name: litert.median_latency_ms(run, first_image, LATENCY_RUNS)
             for name, run in (("saved_model", saved_model),
                               ("tflite", models["tflite"]),
                               ("tflite_int8", models["tflite_int8"]))}
  comparison = {
      "version": version_path,
      "size_bytes": {runtime: model.size_bytes
                     for runtime, model in models.items()},
      **litert.compare(outputs["saved_model"], outputs["tflite"],
                       outputs["tflite_int8"]),
      "latency_ms": latency,
      "latency": f"one image, median of {LATENCY_RUNS} runs after 3 "
                 "untimed ones, on this machine's CPU",
  }
  return _write_evaluation(
      config, split, labels, outputs[config.runtime], class_names,
      {"runtime": config.runtime, "model": models[config.runtime].path,
       "litert": comparison})


def _saved_model_probabilities(loaded):
  """uint8 images -> probabilities, through the SavedModel's serving_tensor
  signature, the TF Serving entry point the LiteRT models stand beside."""
  serve = loaded.signatures["serving_tensor"]
  return lambda images: serve(images=tf.constant(images))[
      "probabilities"].numpy()


def _write_evaluation(config: Config, split: str, labels: np.ndarray,
                      probabilities: np.ndarray, class_names: Sequence[str],
                      extra: Dict) -> Dict:
  """Writes evaluation.json and confusion_matrix.png; returns the former."""
  result = {"split": split, "num_examples": int(len(labels)),
            **compute_metrics(labels, probabilities, class_names), **extra}
  temperature = _folded_temperature(config.workdir)
  result["calibration"] = describe_calibration(labels, probabilities,
                                               temperature)
  files.write_json_atomic(os.path.join(config.workdir, EVALUATION_FILE),
                          result)
  plots.write_reliability_diagram(
      calibration.reliability_bins(probabilities, labels),
      os.path.join(config.workdir, plots.RELIABILITY_FILE),
      before=None if temperature == 1.0 else calibration.reliability_bins(
          calibration.uncalibrated(probabilities, temperature), labels),
      title=f"{split} split: {len(labels)} images, ECE "
      f"{result['calibration']['after']['ece']:.3f}")
  plots.write_confusion_matrix(
      np.array(result["confusion_matrix"]), class_names,
      os.path.join(config.workdir, plots.CONFUSION_MATRIX_FILE),
      title=f"{split} split: {len(labels)} images, "
      f"accuracy {result['accuracy']:.3f}")
  logging.info("Evaluation on %s: accuracy %.4f", split, result["accuracy"])
  return result


def describe_calibration(labels: np.ndarray, probabilities: np.ndarray,
                         temperature: float) -> Dict:
  """evaluation.json's "calibration": the served probabilities' figures
  (`calibration.summarize`) as "after", and with the training run's
  temperature undone as "before" (the same figures when there is none).

  Args:
    labels: int [N].
    probabilities: float [N, C], what the model serves.
    temperature: the temperature folded into the model (report.json).
  """
  after = calibration.summarize(probabilities, labels)
  before = after if temperature == 1.0 else calibration.summarize(
      calibration.uncalibrated(probabilities, temperature), labels)
  return {"temperature": temperature, "bins": calibration.NUM_BINS,
          "before": before, "after": after}


def predict_dataset(model: keras.Model, dataset: tf.data.Dataset
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """Runs `model` over batches of (images, labels).

  Returns:
    (labels int [N], probabilities float [N, C]), in the dataset's order.
  """
  labels, outputs = predict_dataset_with(
      {"model": lambda images: model.predict_on_batch(images)}, dataset)
  return labels, outputs["model"]


def predict_dataset_with(models: Dict[str, Callable], dataset: tf.data.Dataset
                         ) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
  """Runs each of `models` (uint8 images -> probabilities) over batches of
  (images, labels), in one pass over the data.

  Returns:
    (labels int [N], {name: probabilities float [N, C]}), in the dataset's
    order.
  """
  labels, outputs = [], {name: [] for name in models}
  for images, batch_labels in dataset:
    pixels = images.numpy()
    for name, run in models.items():
      outputs[name].append(np.asarray(run(pixels)))
    labels.append(batch_labels.numpy())
  if not labels:
    raise UserError("--dataset: the evaluation split is empty.")
  return np.concatenate(labels), {name: np.concatenate(values)
                                  for name, values in outputs.items()}


def compute_metrics(labels: np.ndarray, probabilities: np.ndarray,
                    class_names: Sequence[str]) -> Dict:
  """Classification metrics from true labels and predicted probabilities.

  Args:
    labels: int [N], true class indices.
    probabilities: float [N, C], the model's outputs.
    class_names: the C names; label i is class_names[i].

  Returns:
    {"accuracy", "loss" (cross-entropy, no label smoothing),
    "top_5_accuracy" (only when C > 5), "per_class" ({name: {"precision",
    "recall", "f1", "support"}}), "macro_avg" (unweighted means of the
    per-class precision, recall, F1), "confusion_matrix" (C x C counts,
    rows = true class, columns = predicted class, in class_names order)}.
    A class never predicted has precision 0, one never present recall 0
    (scikit-learn's `zero_division=0`).
  """
  labels = np.asarray(labels, dtype=np.int64)
  probabilities = np.asarray(probabilities, dtype=np.float64)
  num_classes = len(class_names)
  matrix = confusion_matrix(labels, probabilities.argmax(axis=-1), num_classes)
  true_probability = probabilities[np.arange(len(labels)), labels]
  result = {
      "accuracy": float(np.trace(matrix) / len(labels)),
      "loss": float(np.mean(-np.log(np.clip(true_probability, _EPSILON,
                                            1.0)))),
  }
  if num_classes > TOP_K:
    result[f"top_{TOP_K}_accuracy"] = top_k_accuracy(labels, probabilities,
                                                     TOP_K)
  per_class = per_class_scores(matrix)
  result["per_class"] = {name: scores
                         for name, scores in zip(class_names, per_class)}
  result["macro_avg"] = {
      key: float(np.mean([scores[key] for scores in per_class]))
      for key in ("precision", "recall", "f1")}
  result["confusion_matrix"] = matrix.tolist()
  return result


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """int [C, C]: entry [i, j] counts examples of class i predicted as j."""
  flat = np.bincount(labels * num_classes + predicted,
                     minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes)


def top_k_accuracy(labels: np.ndarray, probabilities: np.ndarray,
                   k: int) -> float:
  """Share of examples whose true class is among the k most probable."""
  top = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=-1)))


def per_class_scores(matrix: np.ndarray) -> list:
  """[{"precision", "recall", "f1", "support"}] per class of a confusion matrix."""
  true_positives = np.diag(matrix).astype(float)
  predicted = matrix.sum(axis=0)
  actual = matrix.sum(axis=1)
  precision = _safe_divide(true_positives, predicted)
  recall = _safe_divide(true_positives, actual)
  f1 = _safe_divide(2 * precision * recall, precision + recall)
  return [{"precision": float(p), "recall": float(r), "f1": float(f),
           "support": int(s)}
          for p, r, f, s in zip(precision, recall, f1, actual)]


def _safe_divide(numerator, denominator):
  denominator = np.asarray(denominator, dtype=float)
  return np.divide(numerator, denominator,
                   out=np.zeros_like(denominator), where=denominator > 0)


def _check_classes(model: keras.Model, class_names: Sequence[str],
                   workdir: str) -> None:
  """The dataset must have the classes the model was trained on."""
  trained = _trained_class_names(workdir)
  num_outputs = model.output_shape[-1]
  if trained is not None and list(trained) != list(class_names):
    raise UserError(
        f"--dataset: its classes {list(class_names)} differ from the ones "
        f"the model in {workdir!r} was trained on {list(trained)}.")
  if num_outputs != len(class_names):
    raise UserError(
        f"--dataset: it has {len(class_names)} classes but the model in "
        f"{workdir!r} has {num_outputs} outputs.")


def _folded_temperature(workdir: str) -> float:
  """The temperature the training run folded into the model; 1.0 for none
  (not significant, --nocalibrate, no validation split, no report.json)."""
  path = os.path.join(workdir, report.REPORT_FILE)
  if not files.exists(path):
    return 1.0
  return files.read_json(path).get("calibration", {}).get("temperature", 1.0)


def _trained_class_names(workdir: str):
  """Class names from report.json, or None without one."""
  path = os.path.join(workdir, report.REPORT_FILE)
  if not files.exists(path):
    return None
  return files.read_json(path).get("class_names")

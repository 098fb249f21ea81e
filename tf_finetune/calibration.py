"""Temperature scaling: calibrated probabilities from one fitted scalar.

Design notes: ARCHITECTURE.md, "Module notes", `calibration.py`.
"""

import math
from typing import Dict, Optional, Tuple

import keras
import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats
import tensorflow as tf

NUM_BINS = 15
CLASSIFIER_NAME = "classifier"
# T is searched in [1/20, 20], in log space. A validation split the model
# separates perfectly drives the optimum towards T -> 0; the bound stops it,
# and a T within 1% of a bound is not used (`choose_temperature`).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
_BOUND_MARGIN = 1.01
KERAS_EPSILON = 1e-7
# Level of the test that decides whether a fitted T is folded at all.
SIGNIFICANCE = 0.05


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray,
                            temperature: float = 1.0) -> float:
  """Mean -log softmax(logits / T)[label], computed stably in float64."""
  scaled = np.asarray(logits, np.float64) / temperature
  labels = np.asarray(labels, np.int64)
  log_probabilities = scaled - scipy.special.logsumexp(scaled, axis=-1,
                                                       keepdims=True)
  return float(-np.mean(log_probabilities[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
  """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising the NLL.

  The NLL is convex in 1/T, so it has one minimum along log T and a
  bounded scalar search finds it. T = 1 is kept unless the search found a
  lower NLL (a flat objective, e.g. one example, can end anywhere).
  """
  def objective(log_t):
    return negative_log_likelihood(logits, labels, math.exp(log_t))

  found = scipy.optimize.minimize_scalar(
      objective, bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)),
      method="bounded", options={"xatol": 1e-5})
  if found.fun < objective(0.0):
    return float(math.exp(found.x))
  return 1.0


def choose_temperature(logits: np.ndarray, labels: np.ndarray) -> Dict:
  """The fitted T, and the T to fold: the fitted one only when it is
  significantly better than T = 1 and not at a bound of the search.

  A likelihood-ratio test: under "T = 1 is right", twice the
  log-likelihood gain of the fitted T is chi-squared with one degree of
  freedom. A few hundred validation images that are already calibrated
  still give a fitted T a little off 1, which would only add noise; below
  SIGNIFICANCE the model is left as trained. A T at a bound is no optimum
  (a validation split classified perfectly has none: its NLL falls all the
  way to T -> 0) and would make every score near 1 or near uniform.

  Returns:
    {"fitted_temperature", "p_value", "temperature" (what to fold: the
    fitted one if it passes both checks, else 1.0), "at_bound"}.
  """
  fitted = fit_temperature(logits, labels)
  gain = len(labels) * (negative_log_likelihood(logits, labels)
                        - negative_log_likelihood(logits, labels, fitted))
  p_value = float(scipy.stats.chi2.sf(2 * max(gain, 0.0), df=1))
  at_bound = not (MIN_TEMPERATURE * _BOUND_MARGIN < fitted
                  < MAX_TEMPERATURE / _BOUND_MARGIN)
  use = p_value < SIGNIFICANCE and not at_bound
  return {"fitted_temperature": fitted, "p_value": p_value,
          "at_bound": at_bound, "temperature": fitted if use else 1.0}


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  """softmax(logits / T) in float64."""
  return scipy.special.softmax(np.asarray(logits, np.float64) / temperature,
                               axis=-1)


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray,
                     num_bins: int = NUM_BINS) -> Dict[str, np.ndarray]:
  """Examples grouped by confidence (their highest probability).

  Bin b holds confidences in (b / B, (b + 1) / B] (bin 0 also 0), as in
  Guo et al.

  Returns:
    {"count" int [B], "confidence" (mean confidence), "accuracy" (share
    predicted right): float [B], NaN in empty bins}.
  """
  probabilities = np.asarray(probabilities, np.float64)
  labels = np.asarray(labels, np.int64)
  confidence = probabilities.max(axis=-1)
  correct = probabilities.argmax(axis=-1) == labels
  bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0,
                 num_bins - 1)
  count = np.bincount(bins, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    return {
        "count": count,
        "confidence": np.bincount(bins, confidence, num_bins) / count,
        "accuracy": np.bincount(bins, correct, num_bins) / count,
    }


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               num_bins: int = NUM_BINS) -> float:
  """sum over bins of (share of examples) * |accuracy - mean confidence|."""
  bins = reliability_bins(probabilities, labels, num_bins)
  used = bins["count"] > 0
  gaps = np.abs(bins["accuracy"][used] - bins["confidence"][used])
  return float(np.sum(bins["count"][used] * gaps) / np.sum(bins["count"]))


def summarize(probabilities: np.ndarray, labels: np.ndarray) -> Dict:
  """{"ece", "nll", "mean_confidence", "accuracy"} of predicted probabilities.

  The NLL clips probabilities at Keras' epsilon, as Keras' cross-entropy
  (the runs' val_loss) and evaluate.py's loss do, so the figures compare.
  """
  probabilities = np.asarray(probabilities, np.float64)
  labels = np.asarray(labels, np.int64)
  true = probabilities[np.arange(len(labels)), labels]
  return {
      "ece": expected_calibration_error(probabilities, labels),
      "nll": float(-np.mean(np.log(np.maximum(true, KERAS_EPSILON)))),
      "mean_confidence": float(np.mean(probabilities.max(axis=-1))),
      "accuracy": float(np.mean(probabilities.argmax(axis=-1) == labels)),
  }


def uncalibrated(probabilities: np.ndarray, temperature: float) -> np.ndarray:
  """The probabilities before a fold of T: softmax(T * log p).

  log p is the folded logits up to a constant per row, so multiplying by T
  gives back the original logits up to that constant.
  """
  log_p = np.log(np.maximum(np.asarray(probabilities, np.float64),
                            np.finfo(np.float32).tiny))
  return softmax(log_p * temperature)


def predict_logits(model: keras.Model, dataset: tf.data.Dataset
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """Logits of the final Dense layer over batches of (images, labels).

  The layer's input (the dropout's output, in inference mode) is computed
  by the model's own layers, under whatever strategy built them, and
  multiplied with its kernel and bias in float64: the softmax's input,
  without the float32 softmax's rounding of tiny probabilities to 0.

  Returns:
    (logits float64 [N, C], labels int64 [N]).
  """
  classifier = model.get_layer(CLASSIFIER_NAME)
  head_input = keras.Model(model.inputs, classifier.input)
  spec = tf.TensorSpec([None, *model.input_shape[1:]], model.inputs[0].dtype)
  # One trace for every batch size, as in features.make_feature_extractor.
  extract = tf.function(lambda images: head_input(images, training=False),
                        input_signature=[spec])
  kernel = np.asarray(classifier.kernel.numpy(), np.float64)
  bias = np.asarray(classifier.bias.numpy(), np.float64)
  logits, labels = [], []
  for images, batch_labels in dataset:
    logits.append(np.asarray(extract(images).numpy(), np.float64) @ kernel
                  + bias)
    labels.append(batch_labels.numpy())
  if not labels:
    return np.zeros((0, kernel.shape[-1])), np.zeros((0,), np.int64)
  return np.concatenate(logits), np.concatenate(labels).astype(np.int64)


def fold_temperature(model: keras.Model, temperature: float) -> None:
  """Divides the final Dense layer's kernel and bias by T, in place.

  Its softmax then returns softmax(logits / T). The assignment runs in the
  scope of the strategy the model was built under, which updates every
  replica's copy.
  """
  classifier = model.get_layer(CLASSIFIER_NAME)
  with model.distribute_strategy.scope():
    for variable in (classifier.kernel, classifier.bias):
      variable.assign(variable / temperature)


def calibrate_model(model: keras.Model, dataset: tf.data.Dataset,
                    split: str = "val") -> Optional[Dict]:
  """Fits T on `dataset`, folds it into `model` if it is significantly
  better than 1 and not at a bound (`choose_temperature`), returns the
  record.

  Returns:
    {"temperature" (folded; 1.0: none), "fitted_temperature", "p_value",
    "at_bound", "split", "num_examples", "bins", "before", "after"} (`summarize` of the
    probabilities before and after, i.e. as trained and as served), or
    None when the split is empty.
  """
  logits, labels = predict_logits(model, dataset)
  if not len(labels):
    return None
  chosen = choose_temperature(logits, labels)
  temperature = chosen["temperature"]
  record = {
      **chosen, "split": split,
      "num_examples": int(len(labels)), "bins": NUM_BINS,
      "before": summarize(softmax(logits), labels),
      "after": summarize(softmax(logits, temperature), labels),
  }
  if temperature != 1.0:
    fold_temperature(model, temperature)
  return record

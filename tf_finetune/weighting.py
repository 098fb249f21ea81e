"""Class weighting: per-example weights for classes that are not balanced.

Design notes: ARCHITECTURE.md, "Module notes", `weighting.py`.
"""

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

# `auto` weighs when the largest training class has at least this many
# times the images of the smallest.
AUTO_RATIO = 2.0
BALANCED_ACCURACY = "balanced accuracy (mean per-class recall)"


def inverse_frequency(counts: Sequence[int]) -> np.ndarray:
  """Per-class weights N / (C * n_c), C the classes present; mean 1 over
  the N examples. A class without examples gets 0 (it weighs nothing)."""
  counts = np.asarray(counts, dtype=np.float64)
  present = counts > 0
  weights = np.zeros_like(counts)
  weights[present] = counts.sum() / (present.sum() * counts[present])
  return weights


@dataclasses.dataclass(frozen=True)
class ClassWeighting:
  """The resolved `--class_weighting` of a run.

  Attributes:
    train_counts: training images per class.
    val_counts: validation images per class.
    weights: per-class training weights, or None when off.
    reason: why they are on or off, in words, for the log and report.
  """
  train_counts: tuple
  val_counts: tuple
  weights: Optional[tuple]
  reason: str

  @property
  def on(self) -> bool:
    return self.weights is not None

  def weigh_train(self, dataset: Optional[tf.data.Dataset]
                  ) -> Optional[tf.data.Dataset]:
    """(x, one-hot y) batches -> (x, y, class weight); unchanged when off."""
    return add_weights(dataset, self.weights) if self.on else dataset

  def weigh_val(self, dataset: Optional[tf.data.Dataset]
                ) -> Optional[tf.data.Dataset]:
    """(x, one-hot y) validation batches -> (x, y, w) whose weighted
    accuracy is the balanced accuracy; unchanged when off."""
    if not self.on:
      return dataset
    return add_weights(dataset, tuple(inverse_frequency(self.val_counts)))

  def measure(self, monitor: str) -> str:
    """What the logged `monitor` measures, for log lines and the report."""
    if not self.on:
      return monitor
    if monitor.endswith("accuracy"):
      return f"{monitor}, a {BALANCED_ACCURACY}"
    return f"{monitor}, class-balanced"

  def describe(self) -> Dict:
    """report.json's "class_weighting"."""
    return {"train_counts": list(self.train_counts),
            "val_counts": list(self.val_counts),
            "weights": None if self.weights is None else list(self.weights),
            "reason": self.reason,
            "validation_measure": BALANCED_ACCURACY if self.on else
                                  "accuracy"}


def resolve(mode: str, class_names: Sequence[str],
            class_counts: Optional[Dict[str, Sequence[int]]]
            ) -> ClassWeighting:
  """`--class_weighting` (auto | none) and the class counts -> weighting.

  Args:
    mode: "auto" or "none".
    class_names: the classes, in label order.
    class_counts: `data.Datasets.class_counts`; None (unknown): off.
  """
  if class_counts is None:
    return ClassWeighting((), (), None, "the class counts are unknown")
  train = tuple(int(n) for n in class_counts["train"])
  val = tuple(int(n) for n in class_counts.get("val") or [0] * len(train))
  present = [n for n in train if n > 0]
  ratio = max(present) / min(present) if present else 1.0
  if mode == "none":
    return ClassWeighting(train, val, None, "--class_weighting=none")
  if ratio < AUTO_RATIO:
    return ClassWeighting(
        train, val, None,
        f"--class_weighting=auto: the largest training class has {ratio:.2f}"
        f"x the images of the smallest, below {AUTO_RATIO:g}x")
  largest, smallest = (class_names[train.index(n)]
                       for n in (max(present), min(present)))
  return ClassWeighting(
      train, val, tuple(float(w) for w in inverse_frequency(train)),
      f"--class_weighting=auto: the largest training class ({largest}) has "
      f"{ratio:.2f}x the images of the smallest ({smallest}), at least "
      f"{AUTO_RATIO:g}x: inverse-frequency weights, mean 1 per training "
      "example")


def add_weights(dataset: Optional[tf.data.Dataset], weights: Sequence[float]
                ) -> Optional[tf.data.Dataset]:
  """(x, y) batches, y one-hot or mixed [B, C] -> (x, y, y . weights).

  A mixed label (MixUp, CutMix) weighs the same mixture of its classes'
  weights.
  """
  if dataset is None:
    return None
  table = tf.constant(weights, tf.float32)
  return dataset.map(
      lambda x, y: (x, y, tf.linalg.matvec(tf.cast(y, tf.float32), table)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def count_labels(labels: tf.data.Dataset, num_classes: int) -> List[int]:
  """Examples per class of a dataset of int labels (scalars or batches)."""
  counts = labels.map(lambda y: tf.reshape(y, [-1])).reduce(
      tf.zeros([num_classes], tf.int64),
      lambda total, y: total + tf.math.bincount(
          tf.cast(y, tf.int32), minlength=num_classes, maxlength=num_classes,
          dtype=tf.int64))
  return [int(n) for n in counts.numpy()]


def confusion_matrix(model, dataset: tf.data.Dataset, num_classes: int
                     ) -> np.ndarray:
  """int [C, C] (rows true, columns predicted) of `model` on (x, one-hot
  y) batches, or padded (x, y, w) ones (`distribute.pad_batches`), under
  any strategy.

  Each replica counts its part of every batch, pads (weight 0) left out,
  and the strategy sums the counts: every worker of a multi-worker run
  takes part and gets the whole matrix. (`model.predict` would gather
  every probability instead.)
  """
  strategy = model.distribute_strategy

  def count(x, y, w=None):
    predicted = tf.argmax(model(x, training=False), axis=-1)
    real = tf.ones_like(predicted) if w is None else tf.cast(w > 0, tf.int64)
    return tf.math.confusion_matrix(tf.argmax(y, axis=-1), predicted,
                                    num_classes, weights=real, dtype=tf.int64)

  @tf.function
  def step(batch):
    return strategy.reduce("SUM", strategy.run(count, args=batch), axis=None)

  total = np.zeros([num_classes, num_classes], np.int64)
  for batch in strategy.experimental_distribute_dataset(dataset):
    total += step(batch).numpy()
  return total


def recall_report(matrix: np.ndarray, class_names: Sequence[str]) -> Dict:
  """{"per_class_recall": {name: recall or None}, "balanced_accuracy"}.

  Balanced accuracy is the mean recall over the classes the split has
  (scikit-learn's `balanced_accuracy_score`); a class without examples has
  no recall (None).
  """
  support = matrix.sum(axis=1)
  recall = [float(matrix[c, c] / support[c]) if support[c] else None
            for c in range(len(class_names))]
  present = [r for r in recall if r is not None]
  return {"per_class_recall": dict(zip(class_names, recall)),
          "balanced_accuracy": float(np.mean(present)) if present else None}

"""Stage head as a linear probe: standardised features, L2 picked on val.

On cached features (features.py) stage head is a convex problem, so it is
solved the way a linear probe is: the pooled features are standardised,
the L2 strength is picked on the validation split from a grid, and the
head trains with it. ARCHITECTURE.md ("Stage head is a linear probe") says
why each part is there.
"""

import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np
from absl import logging

from tf_finetune.model import STANDARDIZE_NAME

# Candidate inverse regularisation strengths, half decades from 1e-3 to
# 1e3: scikit-learn's C of LogisticRegression, which minimises
# ||w||^2 / 2 + C * sum(loss). A Keras head minimises mean(loss) +
# l2 * ||w||^2, the same problem when l2 = 1 / (2 * C * n).
C_GRID = tuple(float(10.0 ** (e / 2)) for e in range(-6, 7))
# Used without a validation split to pick by: the grid's middle, where
# scikit-learn's own default (C = 1) sits.
DEFAULT_C = 1.0
# A feature whose standard deviation is far below the others' (often a
# channel that is zero on nearly every training image) would be blown up by
# standardising and dominate unseen images. Each scale is
# sqrt(std^2 + (SCALE_FLOOR * median std)^2): features well above the
# median are standardised, those far below it keep their small values.
SCALE_FLOOR = 1.0


def l2_of(c: float, train_examples: int) -> float:
  """The Keras L2 factor of scikit-learn's C on `train_examples` examples."""
  return 1.0 / (2.0 * c * train_examples)


def feature_moments(datasets) -> tuple:
  """Mean and floored standard deviation of cached features.

  Args:
    datasets: tf.data datasets of unbatched (features, labels[, weights]),
      e.g. the views of the feature cache (in memory or on disk).

  Returns:
    (mean, scale) as float32 arrays of the feature dimension.
  """
  total = squares = None
  count = 0
  for dataset in datasets:
    for batch, *_ in dataset.batch(4096).as_numpy_iterator():
      batch = batch.astype(np.float64)
      total = batch.sum(0) if total is None else total + batch.sum(0)
      squares = ((batch ** 2).sum(0) if squares is None
                 else squares + (batch ** 2).sum(0))
      count += len(batch)
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
  floor = SCALE_FLOOR * float(np.median(std))
  scale = np.sqrt(std ** 2 + floor ** 2) if floor > 0 else np.ones_like(std)
  return mean.astype(np.float32), scale.astype(np.float32)


def set_standardization(model: keras.Model, mean: np.ndarray,
                        scale: np.ndarray) -> None:
  """Makes `model`'s standardisation layer compute (x - mean) / scale."""
  layer = model.get_layer(STANDARDIZE_NAME)
  with model.distribute_strategy.scope():
    layer.adapt_mean.assign(mean)
    layer.adapt_variance.assign(np.square(scale))
  # Normalization reads its statistics through tensors made from these
  # variables by finalize_state; an assignment alone does not reach them.
  layer.finalize_state()


@dataclasses.dataclass(frozen=True)
class GridPoint:
  """One candidate of the grid and how it did on validation."""
  c: float
  l2: float
  val_accuracy: Optional[float]
  val_loss: Optional[float]


def choose(points: Sequence[GridPoint]) -> GridPoint:
  """The best validation accuracy; ties go to the lower validation loss,
  then to the smaller C (the stronger regularisation of equals)."""
  if any(p.val_accuracy is None for p in points):
    return min(points, key=lambda p: abs(math.log(p.c / DEFAULT_C)))
  return max(points, key=lambda p: (p.val_accuracy, -p.val_loss, -p.c))


def fit_grid(train, steps_per_epoch: int, epochs: int, validation,
             num_classes: int, train_examples: int, mean: np.ndarray,
             scale: np.ndarray, learning_rate: float, label_smoothing: float,
             seed: int, grid: Sequence[float] = C_GRID) -> List[GridPoint]:
  """Trains one linear head per C on standardised features, all at once.

  The heads share the input and nothing else: each has its own weights and
  L2 term, so summing their losses trains each exactly as alone, in one
  pass over the data instead of one per candidate. Every worker of a
  distributed run computes the same grid from the same cache, so this runs
  under the default strategy, with no collective steps.

  Args:
    train: endless batches of (features, one-hot labels[, weights]), as
      `features.training_dataset` makes them; weights (class weighting)
      weigh each head's loss.
    steps_per_epoch: batches per epoch of `train`.
    epochs: passes over the training features.
    validation: batches like `train`, or None; with weights, accuracy and
      loss are weighted means (weighting.py makes the weighted accuracy the
      balanced one).
    num_classes: classes of the head.
    train_examples: examples per epoch (for the C to L2 conversion).
    mean, scale: the standardisation (`feature_moments`).
    learning_rate: Adam's rate, decayed to zero by a cosine over the steps.
    label_smoothing: of the training loss.
    seed: the heads' initialisation.
    grid: candidate values of C.

  Returns:
    One GridPoint per C, in grid order.
  """
  inputs = keras.Input(mean.shape, name="features")
  standardized = keras.layers.Normalization(mean=mean,
                                            variance=np.square(scale))(inputs)
  l2s = [l2_of(c, train_examples) for c in grid]
  outputs = [
      keras.layers.Dense(
          num_classes, activation="softmax", name=f"c{index}",
          kernel_regularizer=keras.regularizers.L2(l2),
          kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(
              standardized) for index, l2 in enumerate(l2s)]
  heads = keras.Model(inputs, outputs, name="probe_grid")
  steps = max(1, epochs * steps_per_epoch)
  heads.compile(
      optimizer=keras.optimizers.Adam(
          keras.optimizers.schedules.CosineDecay(learning_rate, steps)),
      loss=[keras.losses.CategoricalCrossentropy(
          label_smoothing=label_smoothing)] * len(grid))

  def to_every_head(x, y, *weights):
    """(features, labels[, weights]) -> the same for each of the heads."""
    return (x, (y,) * len(grid), *((w,) * len(grid) for w in weights))

  heads.fit(train.map(to_every_head),
            steps_per_epoch=steps_per_epoch, epochs=epochs, verbose=0,
            shuffle=False)
  if validation is None:
    return [GridPoint(c, l2, None, None) for c, l2 in zip(grid, l2s)]
  features, labels, weights = _stack(validation)
  probabilities = heads.predict(features, verbose=0, batch_size=1024)
  return [GridPoint(c, l2, *_scores(p, labels, weights))
          for c, l2, p in zip(grid, l2s, probabilities)]


def _stack(dataset) -> tuple:
  """All (features, one-hot labels[, weights]) batches of `dataset` as
  three arrays (weights all 1 when there are none)."""
  parts = list(dataset.as_numpy_iterator())
  features = np.concatenate([part[0] for part in parts])
  labels = np.concatenate([part[1] for part in parts])
  weights = (np.concatenate([part[2] for part in parts])
             if len(parts[0]) > 2 else np.ones(len(labels)))
  return features, labels, weights


def _scores(probabilities: np.ndarray, labels: np.ndarray,
            weights: np.ndarray) -> tuple:
  """Weighted accuracy and cross-entropy (no smoothing) of one head."""
  truth = labels.argmax(-1)
  correct = probabilities.argmax(-1) == truth
  picked = probabilities[np.arange(len(truth)), truth]
  losses = -np.log(np.clip(picked, 1e-7, 1.0))
  return (float(np.average(correct, weights=weights)),
          float(np.average(losses, weights=weights)))


def describe(points: Sequence[GridPoint], chosen: GridPoint) -> Dict:
  """The stage head record's "probe" field (report.json)."""
  return {"grid": [dataclasses.asdict(p) for p in points],
          "chosen": dataclasses.asdict(chosen),
          "chosen_on": ("val_accuracy" if chosen.val_accuracy is not None
                        else f"no validation split: C={DEFAULT_C:g}"),
          "scale_floor": SCALE_FLOOR}


def log_choice(points: Sequence[GridPoint], chosen: GridPoint) -> None:
  logging.info(
      "Stage head probe: C=%g (L2 %.3g) chosen of %d on validation: %s.",
      chosen.c, chosen.l2, len(points), ", ".join(
          f"C={p.c:g}: {p.val_accuracy:.3f}" for p in points
          if p.val_accuracy is not None) or "no validation split")

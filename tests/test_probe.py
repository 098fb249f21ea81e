"""Stage head as a linear probe (probe.py): the standardisation the model
carries, and the L2 strength picked on validation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_finetune import features, probe
from tf_finetune import model as model_lib


def test_the_model_standardises_features_before_its_dense_layer(tmp_path):
  """The standardisation lives in the model (a built-in Normalization
  layer): images in, softmax(((features - mean) / scale) @ W + b) out, also
  after a save and a load with plain Keras."""
  keras.utils.set_random_seed(0)
  model = model_lib.build_model(3, 32, "none", dropout=0.0)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  pooled = features.make_feature_extractor(model)(images).numpy()
  mean = pooled.mean(0) + rng.normal(size=pooled.shape[1]).astype("float32")
  scale = rng.uniform(0.5, 2.0, pooled.shape[1]).astype("float32")
  probe.set_standardization(model, mean, scale)
  kernel, bias = model.get_layer(model_lib.CLASSIFIER_NAME).get_weights()
  logits = ((pooled - mean) / scale) @ kernel + bias
  expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(model.predict(images, verbose=0), expected,
                             rtol=1e-4, atol=1e-6)
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.saving.load_model(path, safe_mode=True)
  np.testing.assert_allclose(loaded.predict(images, verbose=0), expected,
                             rtol=1e-4, atol=1e-6)


def test_feature_scales_are_floored_at_the_median_scale():
  columns = [np.random.default_rng(1).normal(3.0, 2.0, 1000),
             np.random.default_rng(2).normal(0.0, 1.0, 1000),
             np.zeros(1000),  # A channel that never fires.
             np.random.default_rng(3).normal(0.0, 1e-4, 1000)]
  x = np.stack(columns, 1).astype("float32")
  y = np.zeros((1000, 2), "float32")
  halves = [tf.data.Dataset.from_tensor_slices((x[:400], y[:400])),
            tf.data.Dataset.from_tensor_slices((x[400:], y[400:]))]
  mean, scale = probe.feature_moments(halves)
  np.testing.assert_allclose(mean, x.mean(0), atol=1e-5)
  std = x.astype(np.float64).std(0)
  floor = probe.SCALE_FLOOR * np.median(std)
  np.testing.assert_allclose(scale, np.sqrt(std ** 2 + floor ** 2),
                             rtol=1e-4)
  assert scale[2] == pytest.approx(floor, rel=1e-4)  # Not 0: no blow-up.


def _task(count, seed, dims=60):
  """Two classes told apart by feature 0 alone; the other features are
  noise that a weakly regularised head fits on few training examples."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(count) % 2
  x = rng.normal(size=(count, dims)).astype("float32")
  x[:, 0] += 1.5 * (2 * labels - 1)
  return x, keras.utils.to_categorical(labels, 2).astype("float32")


def test_l2_is_chosen_on_validation_where_training_loss_would_not():
  x, y = _task(24, seed=0)
  val_x, val_y = _task(400, seed=1)
  mean, scale = probe.feature_moments(
      [tf.data.Dataset.from_tensor_slices((x, y))])
  train = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
  grid = (1e-3, 1e-1, 1e1, 1e3)
  points = probe.fit_grid(
      train, 3, 60, tf.data.Dataset.from_tensor_slices(
          (val_x, val_y)).batch(64), 2, len(x), mean, scale, 1e-2, 0.0, 0,
      grid)
  assert [p.c for p in points] == list(grid)
  # The data term of the training loss only falls as C grows (weaker L2):
  # picked by it, the largest C would win; validation says otherwise.
  chosen = probe.choose(points)
  assert chosen.val_accuracy == max(p.val_accuracy for p in points)
  assert chosen.c < grid[-1]
  assert chosen.val_accuracy > points[-1].val_accuracy + 0.05
  assert chosen.l2 == pytest.approx(1 / (2 * chosen.c * len(x)))


def test_ties_go_to_the_lower_loss_then_the_stronger_l2():
  points = [probe.GridPoint(c, probe.l2_of(c, 10), acc, loss)
            for c, acc, loss in ((0.1, 0.8, 0.5), (1.0, 0.9, 0.4),
                                 (10.0, 0.9, 0.3), (100.0, 0.9, 0.3))]
  assert probe.choose(points).c == 10.0
  unvalidated = [probe.GridPoint(c, probe.l2_of(c, 10), None, None)
                 for c in probe.C_GRID]
  assert probe.choose(unvalidated).c == probe.DEFAULT_C


def test_weighted_validation_scores_the_grid_by_balanced_accuracy():
  """With class weighting (weighting.py) cached examples carry weights: the
  heads train on weighted losses, and a candidate's validation accuracy is
  the weighted one, with inverse-frequency weights the balanced accuracy."""
  from sklearn.metrics import balanced_accuracy_score
  x, y = _task(24, seed=0)
  val_x, val_y = _task(90, seed=1)
  keep = np.concatenate([np.flatnonzero(val_y[:, 0])[:10],
                         np.flatnonzero(val_y[:, 1])])  # 10 against 45.
  val_x, val_y = val_x[keep], val_y[keep]
  truth = val_y.argmax(-1)
  val_w = (len(truth) / (2 * np.bincount(truth)))[truth].astype("float32")
  probabilities = np.random.default_rng(2).dirichlet([1, 1], len(truth))
  accuracy, _ = probe._scores(probabilities, val_y, val_w)
  assert accuracy == pytest.approx(
      balanced_accuracy_score(truth, probabilities.argmax(-1)))
  mean, scale = probe.feature_moments(
      [tf.data.Dataset.from_tensor_slices((x, y, np.ones(24, "float32")))])
  train = tf.data.Dataset.from_tensor_slices(
      (x, y, np.ones(len(x), "float32"))).batch(8).repeat()

  def grid(*validation):
    return probe.fit_grid(
        train, 3, 20, tf.data.Dataset.from_tensor_slices(validation).batch(
            16), 2, len(x), mean, scale, 1e-2, 0.0, 0, (1e-2, 1e2))
  weighted, plain = grid(val_x, val_y, val_w), grid(val_x, val_y)
  # Same heads (same seed and data), scored two ways.
  assert [p.val_accuracy for p in weighted] != [p.val_accuracy
                                                for p in plain]

"""Class weighting (`--class_weighting`): when it turns on, how its weights
ride through the input pipeline (padding, the feature cache, two replicas),
the balanced validation measure, and the report's per-class recall."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import balanced_accuracy_score, recall_score

from tf_finetune import config as config_lib, data, distribute, features
from tf_finetune import stages, train, weighting
from test_fault_tolerance import (TINY_BATCH, build_tiny_model, epochs_of,
                                  tiny_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["a", "b", "c"]


def counts(train_counts, val_counts=(4, 4, 4)):
  return {"train": list(train_counts), "val": list(val_counts), "test": []}


# ---------------------------------------------------------------- choice


@pytest.mark.parametrize("train_counts, on", [
    ((10, 5, 5), True),    # exactly 2x
    ((9, 5, 5), False),    # 1.8x
    ((50, 25, 3), True),
    ((7, 7, 7), False),
])
def test_auto_weighs_only_at_a_2x_imbalance(train_counts, on):
  chosen = weighting.resolve("auto", NAMES, counts(train_counts))
  assert chosen.on == on
  if not on:
    assert chosen.weights is None and "below 2x" in chosen.reason
    return
  weights, n = np.array(chosen.weights), np.array(train_counts)
  # Inverse frequency, mean 1 over the training examples.
  np.testing.assert_allclose(weights * n, weights[0] * n[0])
  assert np.sum(weights * n) / n.sum() == pytest.approx(1.0)


def test_none_turns_weighting_off_whatever_the_imbalance():
  chosen = weighting.resolve("none", NAMES, counts((50, 6, 3)))
  assert not chosen.on and chosen.describe()["weights"] is None
  assert chosen.describe()["train_counts"] == [50, 6, 3]
  batches = tf.data.Dataset.from_tensor_slices(
      (np.zeros((4, 2)), np.eye(3)[[0, 1, 2, 0]])).batch(2)
  assert chosen.weigh_train(batches) is batches
  assert chosen.weigh_val(batches) is batches


def test_a_bad_class_weighting_value_names_the_flag(tmp_path):
  with pytest.raises(config_lib.UserError, match="--class_weighting='yes'"):
    config_lib.Config(workdir=str(tmp_path), class_weighting="yes").validate()


# ---------------------------------------------------------------- pipeline


def test_padding_multiplies_class_weights_and_blanks_weigh_zero():
  labels = np.array([0, 1, 2, 0, 0])
  batches = weighting.add_weights(tf.data.Dataset.from_tensor_slices(
      (np.ones((5, 2), "float32"), np.eye(3, dtype="float32")[labels])
  ).batch(4), (0.5, 2.0, 3.0))
  class_weight = np.array([0.5, 2.0, 3.0])[labels]
  padded = list(distribute.pad_batches(batches, 2))
  weights = [w.numpy() for *_, w in padded]
  # Batch of 4 splits evenly: class weights as they are; the last batch of
  # one real example is padded to 2: its weight doubles, the blank's is 0.
  np.testing.assert_allclose(weights[0], class_weight[:4])
  np.testing.assert_allclose(weights[1], [class_weight[4] * 2, 0.0])
  np.testing.assert_array_equal(padded[1][1].numpy()[1], 0)


def test_weighted_validation_accuracy_is_the_balanced_accuracy():
  rng = np.random.default_rng(0)
  labels = np.repeat([0, 1, 2], [20, 7, 3])
  probabilities = rng.dirichlet(np.ones(3), len(labels)).astype("float32")
  val_counts = np.bincount(labels, minlength=3)
  chosen = weighting.resolve("auto", NAMES, counts((30, 10, 5), val_counts))
  # Model outputs stand in for images: the metric sees (y, outputs, w).
  batches = chosen.weigh_val(tf.data.Dataset.from_tensor_slices(
      (probabilities, np.eye(3, dtype="float32")[labels])).batch(8))
  metric = stages.accuracy_metric()
  for outputs, y, w in distribute.pad_batches(batches, 4, len(labels), 8):
    metric.update_state(y, outputs, w)
  assert float(metric.result()) == pytest.approx(
      balanced_accuracy_score(labels, probabilities.argmax(1)), abs=1e-6)


@pytest.mark.parametrize("budget_bytes", [0, 1 << 20], ids=["disk", "memory"])
def test_weights_survive_the_feature_cache(tmp_path, budget_bytes):
  labels = np.arange(7) % 3
  images = np.arange(7 * 4, dtype="float32").reshape(7, 4)
  weighted = weighting.add_weights(tf.data.Dataset.from_tensor_slices(
      (images, np.eye(3, dtype="float32")[labels])).batch(3), (0.5, 2.0, 3.0))
  cache = features.FeatureCache(str(tmp_path / "cache"), budget_bytes)
  progbar = keras.utils.Progbar(None, verbose=0)
  view = cache.store("train-view0", lambda x: x * 2, weighted, progbar)
  assert (view.path is not None) == (budget_bytes == 0)
  cached = [tuple(t.numpy() for t in e) for e in view.dataset()]
  np.testing.assert_array_equal([e[0] for e in cached], images * 2)
  np.testing.assert_array_equal([e[1].argmax() for e in cached], labels)
  np.testing.assert_allclose([e[2] for e in cached],
                             np.array([0.5, 2.0, 3.0])[labels])
  cache.close()


# ---------------------------------------------------------------- training


def tiny_run(config, labels):
  """A tiny model's run whose training labels are `labels` (16 of them)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(len(labels), 6)).astype("float32")
  batches = tf.data.Dataset.from_tensor_slices(
      (x, labels.astype("int32"))).batch(TINY_BATCH)
  datasets = data.Datasets(
      train=batches, train_from=epochs_of(batches), val=batches.take(1),
      test=None, class_names=NAMES,
      num_examples={"train": len(x), "val": TINY_BATCH}, skipped_files=[],
      class_counts=counts(np.bincount(labels, minlength=3),
                          np.bincount(labels[:TINY_BATCH], minlength=3)))
  plan = stages.StagePlan.from_config(config, steps_per_epoch=len(x) //
                                      TINY_BATCH)
  chosen = weighting.resolve(config.class_weighting, NAMES,
                             datasets.class_counts)
  return train.Run(config, None, plan, datasets, build_tiny_model(), chosen)


def train_tiny(tmp_path, labels, class_weighting):
  config = tiny_config(tmp_path / class_weighting, save_every_steps=0,
                       finetune_epochs=1,
                       class_weighting=class_weighting, label_smoothing=0.1)
  run = tiny_run(config, labels)
  callback, best = train.start_stages(run, None)
  train.fit_stages(run, callback, best, [], verbose=0)
  return [v.numpy() for v in run.model.weights]


@pytest.mark.parametrize("labels, identical", [
    (np.arange(16) % 3, True),                             # 6, 5, 5
    (np.array([0] * 10 + [1] * 4 + [2] * 2), False),       # 5x
], ids=["balanced", "imbalanced"])
def test_auto_trains_a_balanced_folder_bit_identically_to_none(
    tmp_path, labels, identical):
  auto = train_tiny(tmp_path, labels, "auto")
  none = train_tiny(tmp_path, labels, "none")
  same = all(np.array_equal(a, b) for a, b in zip(auto, none))
  assert same == identical


def test_report_recall_matches_scikit_learn():
  keras.utils.set_random_seed(1)
  model = keras.Sequential([keras.Input((4,)),
                            keras.layers.Dense(3, activation="softmax")])
  rng = np.random.default_rng(2)
  x = rng.normal(size=(23, 4)).astype("float32")
  labels = np.repeat([0, 1, 2], [15, 6, 2])
  batches = tf.data.Dataset.from_tensor_slices(
      (x, np.eye(3, dtype="float32")[labels])).batch(5)
  matrix = weighting.confusion_matrix(model, batches, 3)
  predicted = model.predict(x, verbose=0).argmax(1)
  result = weighting.recall_report(matrix, NAMES)
  np.testing.assert_allclose(list(result["per_class_recall"].values()),
                             recall_score(labels, predicted, average=None,
                                          labels=[0, 1, 2], zero_division=0))
  assert result["balanced_accuracy"] == pytest.approx(
      balanced_accuracy_score(labels, predicted))


# ------------------------------------------------------- two replicas

# Under `mirrored` on 2 virtual CPUs: weighted (features, labels, weights)
# go through the on-disk feature cache, then padded batches train a head
# one SGD step (3 examples padded to 4) and evaluate it (5 examples in
# batches of 4: the last one padded); prints Keras' figures and the hand
# computation of the label-smoothed, weighted cross-entropy.
MIRRORED = r"""
import json, sys
import numpy as np, tensorflow as tf, keras
from tf_finetune import distribute, features, weighting
distribute.split_cpu(2)
strategy = distribute.create_strategy("mirrored")
SMOOTHING, RATE, CLASS_WEIGHTS = 0.1, 0.5, (0.4, 1.5, 3.0)
keras.utils.set_random_seed(1)
with strategy.scope():
  model = keras.Sequential([keras.Input((4,)),
                            keras.layers.Dense(3, activation="softmax")])
  model.compile(optimizer=keras.optimizers.SGD(RATE),
                loss=keras.losses.CategoricalCrossentropy(
                    label_smoothing=SMOOTHING),
                weighted_metrics=[keras.metrics.CategoricalAccuracy(
                    name="accuracy")])
rng = np.random.default_rng(0)
x = rng.normal(size=(5, 4)).astype("float32")
labels = np.array([0, 2, 1, 2, 0])
one_hot = np.eye(3, dtype="float32")[labels]
weighted = weighting.add_weights(
    tf.data.Dataset.from_tensor_slices((x, one_hot)).batch(2), CLASS_WEIGHTS)
cache = features.FeatureCache(sys.argv[1], 0)  # budget 0: all on disk
view = cache.store("train-view0", lambda images: images, weighted,
                   keras.utils.Progbar(None, verbose=0))
cached = view.dataset()
w = np.array(CLASS_WEIGHTS, "float32")[labels]

def hand_loss(n):  # sum(w * l) / n over the first n examples
  p = tf.clip_by_value(model(x[:n]), 1e-7, 1 - 1e-7)
  smooth = one_hot[:n] * (1 - SMOOTHING) + SMOOTHING / 3
  return tf.reduce_sum(w[:n] * -tf.reduce_sum(smooth * tf.math.log(p), -1)) / n

evaluated = model.evaluate(distribute.pad_batches(cached.batch(4), 2, 5, 4),
                           verbose=0, return_dict=True)
predicted = model(x).numpy().argmax(1)
hand = {"loss": float(hand_loss(5)),
        "accuracy": float(np.sum(w * (predicted == labels)) / np.sum(w))}
before = [v.numpy() for v in model.trainable_variables]
with tf.GradientTape() as tape:
  loss = hand_loss(3)
gradients = tape.gradient(loss, model.trainable_variables)
model.fit(distribute.pad_batches(cached.take(3).batch(3), 2), verbose=0)
step = max(float(np.max(np.abs(b - RATE * g.numpy() - v.numpy())))
           for b, g, v in zip(before, gradients, model.trainable_variables))
print(json.dumps({"keras": evaluated, "hand": hand, "step_difference": step,
                  "on_disk": view.path is not None}))
"""


@pytest.mark.slow
def test_weighted_loss_under_two_replicas_equals_the_hand_computation(
    tmp_path):
  result = subprocess.run([sys.executable, "-c", MIRRORED,
                           str(tmp_path / "cache")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  assert figures["on_disk"]
  assert figures["keras"]["loss"] == pytest.approx(figures["hand"]["loss"],
                                                   rel=1e-5)
  assert figures["keras"]["accuracy"] == pytest.approx(
      figures["hand"]["accuracy"], abs=1e-6)
  # The padded step on two replicas moved the weights as the gradient of
  # sum(w * l) / 3 over the three real examples says.
  assert figures["step_difference"] < 1e-5

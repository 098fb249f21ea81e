"""Tests for tf_finetune.calibration: temperature fitting, folding, ECE; and
train.calibrate's switch, on a tiny Keras model."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_finetune import calibration, train
from tf_finetune.config import Config


def sample_task(num_examples=4000, num_classes=5, seed=0):
  """Logits and labels drawn from softmax(logits): calibrated at T = 1."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, 2.0, (num_examples, num_classes))
  probabilities = calibration.softmax(logits)
  labels = np.array([rng.choice(num_classes, p=p) for p in probabilities])
  return logits, labels


@pytest.mark.parametrize("scale", [0.4, 3.0])
def test_fitted_temperature_undoes_a_scaling_of_calibrated_logits(scale):
  # scale < 1: underconfident logits, T < 1 sharpens them; scale > 1:
  # overconfident, T > 1 softens them. Either way T comes back as `scale`.
  logits, labels = sample_task()
  scaled = logits * scale
  temperature = calibration.fit_temperature(scaled, labels)
  assert temperature == pytest.approx(scale, rel=0.1)
  assert (calibration.negative_log_likelihood(scaled, labels, temperature)
          < calibration.negative_log_likelihood(scaled, labels) - 0.01)
  # The recovered probabilities are calibrated again.
  assert (calibration.expected_calibration_error(
      calibration.softmax(scaled, temperature), labels)
          < calibration.expected_calibration_error(
              calibration.softmax(scaled), labels))


def test_only_a_significantly_better_temperature_is_used():
  # Calibrated logits: the fitted T is near 1 by chance only.
  logits, labels = sample_task(num_examples=500, seed=3)
  chosen = calibration.choose_temperature(logits, labels)
  assert chosen["fitted_temperature"] == pytest.approx(1.0, abs=0.1)
  assert chosen["p_value"] >= calibration.SIGNIFICANCE
  assert chosen["temperature"] == 1.0
  # Underconfident ones: T is used, p from the chi-squared law of twice the
  # log-likelihood gain.
  chosen = calibration.choose_temperature(logits * 0.6, labels)
  gain = 500 * (calibration.negative_log_likelihood(logits * 0.6, labels)
                - calibration.negative_log_likelihood(
                    logits * 0.6, labels, chosen["fitted_temperature"]))
  from scipy.stats import chi2
  assert chosen["p_value"] == pytest.approx(chi2.sf(2 * gain, 1))
  assert chosen["p_value"] < calibration.SIGNIFICANCE
  assert chosen["temperature"] == chosen["fitted_temperature"] < 1


def test_a_perfectly_separated_split_gets_no_temperature():
  # Every example right with a margin: the NLL falls all the way to T -> 0.
  logits, labels = sample_task(num_examples=200, seed=4)
  labels = logits.argmax(axis=-1)
  chosen = calibration.choose_temperature(logits * 5, labels)
  assert chosen["fitted_temperature"] == pytest.approx(
      calibration.MIN_TEMPERATURE, rel=0.01)
  assert chosen["at_bound"] and chosen["temperature"] == 1.0


def test_negative_log_likelihood_matches_scikit_learn():
  from sklearn.metrics import log_loss
  logits, labels = sample_task(num_examples=50)
  assert calibration.negative_log_likelihood(logits, labels, 2.0) == (
      pytest.approx(log_loss(labels, calibration.softmax(logits, 2.0),
                             labels=range(5))))


def test_expected_calibration_error_matches_a_hand_computation():
  # 15 bins: bin b holds confidences in (b/15, (b+1)/15].
  probabilities = np.array([[0.95, 0.05, 0.0],    # 14.25/15: bin 14, right
                            [0.9, 0.1, 0.0],      # 13.5/15: bin 13, wrong
                            [0.58, 0.42, 0.0],    # 8.7/15: bin 8, right
                            [0.2, 0.55, 0.25],    # 8.25/15: bin 8, wrong
                            [0.31, 0.31, 0.38]])  # 5.7/15: bin 5, right
  labels = np.array([0, 1, 0, 0, 2])
  # |accuracy - confidence| per bin, weighted by its share of examples:
  # bin 14: |1 - 0.95|, bin 13: |0 - 0.9|, bin 8: |0.5 - 0.565| (two
  # examples), bin 5: |1 - 0.38|.
  expected = (0.05 + 0.9 + 2 * 0.065 + 0.62) / 5
  assert calibration.expected_calibration_error(probabilities, labels) == (
      pytest.approx(expected))
  bins = calibration.reliability_bins(probabilities, labels)
  assert bins["count"].tolist() == [0] * 5 + [1, 0, 0, 2, 0, 0, 0, 0, 1, 1]
  assert bins["accuracy"][8] == pytest.approx(0.5)
  assert bins["confidence"][8] == pytest.approx(0.565)
  summary = calibration.summarize(probabilities, labels)
  assert summary["ece"] == pytest.approx(expected)
  assert summary["accuracy"] == pytest.approx(3 / 5)
  assert summary["mean_confidence"] == pytest.approx(3.36 / 5)
  assert summary["nll"] == pytest.approx(-np.mean(np.log(
      [0.95, 0.1, 0.58, 0.2, 0.38])))


def test_uncalibrated_undoes_a_temperature():
  logits, _ = sample_task(num_examples=20)
  folded = calibration.softmax(logits, 2.5)
  np.testing.assert_allclose(calibration.uncalibrated(folded, 2.5),
                             calibration.softmax(logits), atol=1e-12)


def tiny_classifier(seed=0, num_classes=3):
  """uint8 [4, 4, 3] -> "pool" -> dropout -> "classifier" Dense softmax,
  the layer names of model.build_model."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((4, 4, 3), dtype="uint8")
  x = keras.layers.Rescaling(1 / 255.0)(inputs)
  x = keras.layers.Flatten(name="pool")(x)
  x = keras.layers.Dropout(0.5, name="dropout")(x)
  outputs = keras.layers.Dense(num_classes, activation="softmax",
                               dtype="float32", name="classifier")(x)
  model = keras.Model(inputs, outputs)
  # Large weights: confident, wrong-ish outputs for the fit to correct.
  kernel = model.get_layer("classifier").kernel
  kernel.assign(kernel * 3.0)
  return model


def tiny_dataset(num_examples=60, num_classes=3, seed=1):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_examples, 4, 4, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, num_examples)
  return tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)


def test_folding_scales_logits_and_keeps_every_prediction(tmp_path):
  model, dataset = tiny_classifier(), tiny_dataset()
  images = np.concatenate([x.numpy() for x, _ in dataset])
  logits, _ = calibration.predict_logits(model, dataset)
  before = model.predict_on_batch(images)
  np.testing.assert_allclose(before, calibration.softmax(logits), atol=1e-6)
  calibration.fold_temperature(model, 3.0)
  after = model.predict_on_batch(images)
  np.testing.assert_allclose(after, calibration.softmax(logits, 3.0),
                             atol=1e-6)
  assert (after.argmax(-1) == before.argmax(-1)).all()
  assert after.max(-1).mean() < before.max(-1).mean()
  # model.keras carries the fold: same architecture, calibrated outputs.
  path = str(tmp_path / "model.keras")
  model.save(path)
  reloaded = keras.models.load_model(path, safe_mode=True)
  assert [l.name for l in reloaded.layers] == [l.name for l in model.layers]
  np.testing.assert_allclose(reloaded.predict_on_batch(images), after,
                             atol=1e-6)


def test_calibrate_model_folds_the_fitted_temperature():
  model, dataset = tiny_classifier(), tiny_dataset()
  logits, labels = calibration.predict_logits(model, dataset)
  record = calibration.calibrate_model(model, dataset)
  assert record["temperature"] == record["fitted_temperature"] == (
      pytest.approx(calibration.fit_temperature(logits, labels)))
  assert record["p_value"] < calibration.SIGNIFICANCE
  assert record["num_examples"] == 60 and record["split"] == "val"
  assert record["after"]["nll"] < record["before"]["nll"]
  assert record["after"]["accuracy"] == record["before"]["accuracy"]
  assert record["before"]["nll"] == pytest.approx(
      calibration.negative_log_likelihood(logits, labels))
  folded, _ = calibration.predict_logits(model, dataset)
  np.testing.assert_allclose(folded, logits / record["temperature"],
                             rtol=1e-5, atol=1e-5)


def test_calibrate_under_a_mirrored_strategy_assigns_every_copy():
  # Two logical CPUs exist only if configured before TensorFlow starts, so
  # this uses the process' devices (tests/test_distribute.py trains and
  # calibrates on two); on one, the variables are still MirroredVariables.
  strategy = tf.distribute.MirroredStrategy(
      [d.name for d in tf.config.list_logical_devices("CPU")])
  with strategy.scope():
    model = tiny_classifier()
  record = calibration.calibrate_model(model, tiny_dataset())
  kernel = model.get_layer("classifier").kernel
  for copy in strategy.experimental_local_results(kernel):
    np.testing.assert_allclose(copy.numpy(), kernel.numpy())
  assert record["after"]["nll"] < record["before"]["nll"]


def datasets_with(val):
  return types.SimpleNamespace(val=val)


def classifier_weights(model):
  return [w.numpy().copy() for w in model.get_layer("classifier").weights]


def test_nocalibrate_leaves_the_classifier_untouched():
  model = tiny_classifier()
  weights = classifier_weights(model)
  config = Config(workdir="w", calibrate=False)
  record = train.calibrate(config, model, datasets_with(tiny_dataset()))
  assert record == {"skipped": "--nocalibrate"}
  for old, new in zip(weights, classifier_weights(model)):
    np.testing.assert_array_equal(old, new)


def test_calibrate_without_a_validation_split_is_skipped():
  model = tiny_classifier()
  weights = classifier_weights(model)
  record = train.calibrate(Config(workdir="w"), model, datasets_with(None))
  assert record == {"skipped": "no validation split"}
  empty = tiny_dataset().take(0)
  assert train.calibrate(Config(workdir="w"), model,
                         datasets_with(empty)) == {
                             "skipped": "empty validation split"}
  for old, new in zip(weights, classifier_weights(model)):
    np.testing.assert_array_equal(old, new)

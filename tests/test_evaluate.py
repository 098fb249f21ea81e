"""Tests for tf_finetune.evaluate: the metrics by hand, and --mode=evaluate
on the session's real training run."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from tf_finetune import evaluate

NAMES = ["cat", "dog", "fox"]


def one_hot_probabilities(predicted, num_classes, confidence=0.8):
  rest = (1 - confidence) / (num_classes - 1)
  probabilities = np.full((len(predicted), num_classes), rest)
  probabilities[np.arange(len(predicted)), predicted] = confidence
  return probabilities


def test_metrics_match_a_hand_computed_example():
  labels = np.array([0, 0, 0, 1, 1, 2])
  predicted = np.array([0, 0, 1, 1, 0, 1])
  metrics = evaluate.compute_metrics(
      labels, one_hot_probabilities(predicted, 3), NAMES)
  assert metrics["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
  assert metrics["accuracy"] == pytest.approx(3 / 6)
  cat, dog, fox = (metrics["per_class"][name] for name in NAMES)
  # cat: 2 of 3 predicted cats are cats, 2 of 3 cats found.
  assert (cat["precision"], cat["recall"]) == pytest.approx((2 / 3, 2 / 3))
  assert cat["f1"] == pytest.approx(2 / 3)
  # dog: 1 of 3 predicted dogs, 1 of 2 dogs: F1 = 2pr/(p+r) = 0.4.
  assert (dog["precision"], dog["recall"]) == pytest.approx((1 / 3, 1 / 2))
  assert dog["f1"] == pytest.approx(0.4)
  # fox is never predicted: precision 0 rather than a division by zero.
  assert (fox["precision"], fox["recall"], fox["f1"]) == (0.0, 0.0, 0.0)
  assert [cat["support"], dog["support"], fox["support"]] == [3, 2, 1]
  assert metrics["macro_avg"]["f1"] == pytest.approx((2 / 3 + 0.4) / 3)
  # Cross-entropy of the true class' probability: 0.8 right, 0.1 wrong.
  assert metrics["loss"] == pytest.approx(
      -(3 * np.log(0.8) + 3 * np.log(0.1)) / 6)
  assert "top_5_accuracy" not in metrics


def test_top_5_accuracy_only_above_5_classes():
  names = [f"c{i}" for i in range(7)]
  labels = np.array([0, 1, 2, 3])
  # Ranked classes per example, most probable first.
  rankings = [[0, 1, 2, 3, 4, 5, 6],   # true class first
              [0, 2, 3, 4, 1, 5, 6],   # true class 5th: counts
              [0, 1, 3, 4, 5, 2, 6],   # true class 6th: does not
              [6, 5, 4, 0, 1, 2, 3]]   # true class last
  probabilities = np.zeros((4, 7))
  for row, ranking in enumerate(rankings):
    probabilities[row, ranking] = np.linspace(0.4, 0.01, 7)
  metrics = evaluate.compute_metrics(labels, probabilities, names)
  assert metrics["top_5_accuracy"] == pytest.approx(2 / 4)
  assert metrics["accuracy"] == pytest.approx(1 / 4)
  five = evaluate.compute_metrics(labels, probabilities[:, :5], names[:5])
  assert "top_5_accuracy" not in five


def test_evaluate_mode_writes_metrics_and_confusion_matrix(smoke_run,
                                                           smoke_flags):
  workdir, _ = smoke_run
  result = run_cli(*smoke_flags, "--mode=evaluate")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "evaluation.json")) as f:
    evaluation = json.load(f)
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  names = report["class_names"]
  assert evaluation["split"] == "test"
  assert evaluation["num_examples"] == report["num_examples"]["test"]
  # The reloaded model.keras measures what training measured.
  assert evaluation["accuracy"] == pytest.approx(report["test_accuracy"],
                                                 abs=1e-6)
  matrix = np.array(evaluation["confusion_matrix"])
  assert matrix.shape == (len(names), len(names))
  assert matrix.sum() == evaluation["num_examples"]
  assert np.trace(matrix) / matrix.sum() == pytest.approx(
      evaluation["accuracy"])
  assert list(evaluation["per_class"]) == names
  for name, row in zip(names, matrix):
    assert evaluation["per_class"][name]["support"] == row.sum()
  assert "top_5_accuracy" not in evaluation  # The demo has 5 classes.
  with Image.open(os.path.join(workdir, "confusion_matrix.png")) as image:
    assert image.format == "PNG"
  assert f"test accuracy: {evaluation['accuracy']:.4f}" in result.stdout
  # Calibration of the served probabilities on the test split, and with
  # the training run's temperature undone.
  calibrated = evaluation["calibration"]
  assert calibrated["temperature"] == report["calibration"]["temperature"]
  after = calibrated["after"]
  assert after["nll"] == pytest.approx(evaluation["loss"], rel=1e-4)
  assert after["accuracy"] == calibrated["before"]["accuracy"] == (
      evaluation["accuracy"])
  if calibrated["temperature"] != 1.0:
    assert calibrated["before"]["nll"] != pytest.approx(after["nll"])
  with Image.open(os.path.join(workdir, "reliability.png")) as image:
    assert image.format == "PNG"


@pytest.mark.slow
def test_evaluate_without_a_trained_model_is_a_clear_error(tmp_path):
  result = run_cli("--flagfile=configs/smoke.cfg", f"--workdir={tmp_path}",
                   "--mode=evaluate", timeout=120)
  assert result.returncode == 2
  assert "no model.keras there; train first" in result.stderr
  assert "Traceback" not in result.stderr
  assert os.listdir(tmp_path) == []

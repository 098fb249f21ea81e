"""Tests for tf_finetune.plots: the figures' content, and the PNG files."""

import math
import os

import numpy as np
import pytest
from PIL import Image

from tf_finetune import plots


def make_stage(name, epochs, learning_rate, offset=0.0, with_val=True):
  history = {"loss": [2.0 - offset - 0.1 * i for i in range(epochs)],
             "accuracy": [0.3 + offset + 0.05 * i for i in range(epochs)],
             "learning_rate": [learning_rate] * epochs}
  if with_val:
    history["val_loss"] = [v + 0.2 for v in history["loss"]]
    history["val_accuracy"] = [v - 0.1 for v in history["accuracy"]]
  return {"name": name, "epochs": epochs, "history": history}


STAGES = [make_stage("head", 3, 1e-3), make_stage("finetune", 2, 1e-5, 0.5)]


def lines_by_label(axes):
  return {line.get_label(): line for line in axes.get_lines()
          if not line.get_label().startswith("_")}


def vertical_lines(axes):
  """x of the vertical lines drawn across the axes (the stage markers)."""
  return [line.get_xdata()[0] for line in axes.get_lines()
          if line.get_label().startswith("_")
          and len(set(line.get_xdata())) == 1]


def test_stage_boundary_sits_between_the_last_head_and_first_finetune_epoch():
  assert plots.stage_boundaries(STAGES) == [3.5]
  assert plots.stage_boundaries(STAGES[:1]) == []
  three = STAGES + [make_stage("extra", 4, 1e-6)]
  assert plots.stage_boundaries(three) == [3.5, 5.5]


def test_curves_put_both_stages_on_one_epoch_axis_with_the_boundary():
  figure = plots.build_curves_figure(STAGES)
  axes = figure.get_axes()
  assert [a.get_ylabel() for a in axes] == ["loss", "accuracy",
                                            "learning rate"]
  for panel, metric in zip(axes, ("loss", "accuracy", "learning_rate")):
    assert vertical_lines(panel) == [3.5]
    lines = lines_by_label(panel)
    expected = STAGES[0]["history"][metric] + STAGES[1]["history"][metric]
    np.testing.assert_allclose(lines["train"].get_xdata(), [1, 2, 3, 4, 5])
    np.testing.assert_allclose(lines["train"].get_ydata(), expected)
    assert ("validation" in lines) == (metric != "learning_rate")
  assert axes[2].get_yscale() == "log"
  texts = [t.get_text() for t in axes[0].texts]
  assert texts == ["finetune starts"]


def test_a_stage_without_validation_keeps_later_epochs_in_place():
  stages = [make_stage("head", 2, 1e-3, with_val=False),
            make_stage("finetune", 2, 1e-4)]
  figure = plots.build_curves_figure(stages)
  validation = lines_by_label(figure.get_axes()[0])["validation"]
  values = validation.get_ydata()
  assert [math.isnan(v) for v in values] == [True, True, False, False]
  np.testing.assert_allclose(values[2:], stages[1]["history"]["val_loss"])


def test_png_files_are_written(tmp_path):
  curves = plots.write_curves(STAGES, str(tmp_path / plots.CURVES_FILE))
  matrix = np.array([[3, 1], [0, 4]])
  confusion = plots.write_confusion_matrix(
      matrix, ["cat", "dog"], str(tmp_path / plots.CONFUSION_MATRIX_FILE))
  for path in (curves, confusion):
    with Image.open(path) as image:
      assert image.format == "PNG" and min(image.size) > 200
  assert sorted(os.listdir(tmp_path)) == ["confusion_matrix.png",
                                          "curves.png"]


def test_confusion_matrix_figure_shows_the_counts_and_names():
  matrix = np.array([[3, 1, 0], [0, 4, 2], [1, 0, 5]])
  figure = plots.build_confusion_matrix_figure(matrix, ["a", "b", "c"])
  axes = figure.get_axes()[0]
  np.testing.assert_array_equal(axes.get_images()[0].get_array(), matrix)
  assert [t.get_text() for t in axes.get_xticklabels()] == ["a", "b", "c"]
  assert [t.get_text() for t in axes.get_yticklabels()] == ["a", "b", "c"]
  assert sorted(int(t.get_text()) for t in axes.texts) == sorted(
      matrix.ravel())


def test_reliability_diagram_shows_each_bins_accuracy(tmp_path):
  from tf_finetune import calibration
  probabilities = np.array([[0.95, 0.05], [0.9, 0.1], [0.7, 0.3],
                            [0.4, 0.6]])
  labels = np.array([0, 1, 0, 1])
  bins = calibration.reliability_bins(probabilities, labels)
  before = calibration.reliability_bins(probabilities ** 2 / np.sum(
      probabilities ** 2, axis=1, keepdims=True), labels)
  figure = plots.build_reliability_figure(bins, before)
  axes, counts = figure.get_axes()
  heights = [bar.get_height() for bar in axes.patches]
  np.testing.assert_allclose(heights, np.nan_to_num(bins["accuracy"]))
  assert sum(bar.get_height() for bar in counts.patches) == (
      pytest.approx(1.0))
  points = lines_by_label(axes)["before temperature scaling"]
  used = before["count"] > 0
  np.testing.assert_allclose(points.get_xdata(), before["confidence"][used])
  path = plots.write_reliability_diagram(
      bins, str(tmp_path / plots.RELIABILITY_FILE))
  with Image.open(path) as image:
    assert image.format == "PNG" and min(image.size) > 200

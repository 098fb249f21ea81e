"""Plots of a run, as PNG files: training curves, the confusion matrix and
the reliability diagram.

Drawn on matplotlib's Agg canvas directly (no pyplot): no display needed,
no global backend switch, and nothing kept alive between figures. Each file
is moved into place whole (files.atomic_output), like the JSON files.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tf_finetune import files

CURVES_FILE = "curves.png"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
RELIABILITY_FILE = "reliability.png"
# One panel per metric; the "val_" series of a metric shares its panel.
CURVE_PANELS = ("loss", "accuracy", "learning_rate")
# Above this many classes the per-cell counts would be unreadable.
_MAX_ANNOTATED_CLASSES = 30


def stage_boundaries(stages: Sequence[Dict]) -> List[float]:
  """x positions (between two epochs) where each stage after the first starts.

  Epochs are numbered 1, 2, ... across all stages, as in TensorBoard's one
  epoch axis; a stage's length is the epochs it recorded in its history.
  """
  boundaries, epochs = [], 0
  for index, stage in enumerate(stages):
    if index > 0:
      boundaries.append(epochs + 0.5)
    epochs += _recorded_epochs(stage)
  return boundaries


def build_curves_figure(stages: Sequence[Dict],
                        kept: Optional[Dict] = None) -> Figure:
  """Loss, accuracy and learning rate of all stages on one epoch axis.

  Args:
    stages: report.json's "stages": dicts with "name" and "history" (Keras
      metric lists, one value per epoch of that stage).
    kept: report.json's "kept" (its 0-based "epoch" is marked), or None.

  Returns:
    The figure: one axes per metric in CURVE_PANELS that the history has,
    each with a dashed vertical line where a new stage starts and a dotted
    one at the epoch whose weights were kept.
  """
  panels = [m for m in CURVE_PANELS
            if any(m in s["history"] for s in stages)]
  figure = Figure(figsize=(6.4, 2.4 * max(len(panels), 1)),
                  layout="constrained")
  for index, metric in enumerate(panels):
    axes = figure.add_subplot(len(panels), 1, index + 1)
    for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
      values = _concatenate(stages, key)
      if values is not None and metric == "learning_rate":
        # A schedule that decays to zero ends at 0, which a log axis drops.
        values = np.where(values > 0, values, np.nan)
      if values is not None:
        axes.plot(np.arange(1, len(values) + 1), values, marker="o",
                  label=label)
    _mark_stages(axes, stages)
    if kept is not None:
      _mark_kept(axes, kept["epoch"] + 1)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(metric.replace("_", " "))
    if metric == "learning_rate" and _has_positive(stages, metric):
      axes.set_yscale("log")
    axes.legend(loc="best", fontsize="small")
  if panels:
    axes.set_xlabel("epoch")
  return figure


def write_curves(stages: Sequence[Dict], path: str,
                 kept: Optional[Dict] = None) -> str:
  """Draws `build_curves_figure(stages, kept)` into the PNG file `path`."""
  save_figure_atomic(build_curves_figure(stages, kept), path)
  return path


def build_confusion_matrix_figure(matrix: np.ndarray,
                                  class_names: Sequence[str],
                                  title: str = "") -> Figure:
  """Counts of true class (rows) against predicted class (columns)."""
  matrix = np.asarray(matrix)
  size = min(4 + 0.45 * len(class_names), 30)
  figure = Figure(figsize=(size, size), layout="constrained")
  axes = figure.add_subplot()
  image = axes.imshow(matrix, cmap="Blues")
  figure.colorbar(image, ax=axes, shrink=0.8)
  ticks = np.arange(len(class_names))
  axes.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
  axes.set_yticks(ticks, labels=class_names)
  axes.set_xlabel("predicted class")
  axes.set_ylabel("true class")
  axes.set_title(title)
  if len(class_names) <= _MAX_ANNOTATED_CLASSES:
    threshold = matrix.max() / 2
    for (row, column), count in np.ndenumerate(matrix):
      axes.text(column, row, str(count), ha="center", va="center",
                color="white" if count > threshold else "black")
  return figure


def write_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str],
                           path: str, title: str = "") -> str:
  """Draws `build_confusion_matrix_figure` into the PNG file `path`."""
  save_figure_atomic(
      build_confusion_matrix_figure(matrix, class_names, title), path)
  return path


def build_reliability_figure(bins: Dict[str, np.ndarray],
                             before: Optional[Dict[str, np.ndarray]] = None,
                             title: str = "") -> Figure:
  """Accuracy against confidence per bin (calibration.reliability_bins).

  Bars: the served probabilities' accuracy in each equal-width confidence
  bin; a calibrated model's bars reach the diagonal. `before`, when given,
  is drawn as points: the same bins before temperature scaling. Below, the
  share of examples in each bin.
  """
  num_bins = len(bins["count"])
  centres = (np.arange(num_bins) + 0.5) / num_bins
  figure = Figure(figsize=(5.0, 6.0), layout="constrained")
  axes, counts = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
  axes.bar(centres, np.nan_to_num(bins["accuracy"]), width=1 / num_bins,
           edgecolor="black", label="accuracy (served)")
  axes.plot([0, 1], [0, 1], color="gray", linestyle="--",
            label="perfect calibration")
  if before is not None:
    used = before["count"] > 0
    axes.plot(before["confidence"][used], before["accuracy"][used],
              marker="o", linestyle="none", color="tab:red",
              label="before temperature scaling")
  axes.set_xlim(0, 1)
  axes.set_ylim(0, 1)
  axes.set_ylabel("accuracy")
  axes.set_title(title)
  axes.legend(loc="upper left", fontsize="small")
  counts.bar(centres, bins["count"] / max(bins["count"].sum(), 1),
             width=1 / num_bins, edgecolor="black")
  counts.set_xlabel("confidence (highest probability)")
  counts.set_ylabel("share")
  return figure


def write_reliability_diagram(bins: Dict[str, np.ndarray], path: str,
                              before: Optional[Dict[str, np.ndarray]] = None,
                              title: str = "") -> str:
  """Draws `build_reliability_figure` into the PNG file `path`."""
  save_figure_atomic(build_reliability_figure(bins, before, title), path)
  return path


def save_figure_atomic(figure: Figure, path: str) -> None:
  """Renders `figure` as PNG into `path`, all or nothing."""
  with files.atomic_output(path) as temp:
    FigureCanvasAgg(figure).print_png(temp)


def _recorded_epochs(stage: Dict) -> int:
  return max((len(v) for v in stage["history"].values()), default=0)


def _concatenate(stages, key):
  """One list over all stages, or None if no stage recorded `key`.

  A stage that lacks the key (e.g. no validation data) contributes NaNs so
  the later stages stay at their true epochs.
  """
  if not any(key in s["history"] for s in stages):
    return None
  values = []
  for stage in stages:
    values.extend(stage["history"].get(key, [np.nan] * _recorded_epochs(stage)))
  return np.asarray(values, dtype=float)


def _mark_stages(axes, stages):
  for boundary, stage in zip(stage_boundaries(stages), stages[1:]):
    axes.axvline(boundary, color="gray", linestyle="--", linewidth=1)
    axes.annotate(f"{stage['name']} starts", (boundary, 1.0),
                  xycoords=("data", "axes fraction"), xytext=(3, -3),
                  textcoords="offset points", va="top", fontsize="small",
                  color="gray")


def _mark_kept(axes, epoch: int):
  axes.axvline(epoch, color="green", linestyle=":", linewidth=1.5)
  axes.annotate("kept", (epoch, 0.0), xycoords=("data", "axes fraction"),
                xytext=(3, 3), textcoords="offset points", va="bottom",
                fontsize="small", color="green")


def _has_positive(stages, key) -> bool:
  values = _concatenate(stages, key)
  return values is not None and bool(np.any(values > 0))

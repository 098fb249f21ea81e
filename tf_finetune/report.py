"""report.json: what a training run did, written atomically (files.py)."""

import os
from typing import Dict, List, Optional, Sequence

from tf_finetune import files
from tf_finetune.selection import KeptEpoch
from tf_finetune.stages import StageRecord

REPORT_FILE = "report.json"


def build_report(*, class_names: List[str], num_examples: Dict[str, int],
                 skipped_files: List[Dict], stages: Sequence[StageRecord],
                 val_accuracy: float, test_accuracy: Optional[float],
                 export_path: str, config: Dict, seconds: float,
                 speed: Optional[Dict] = None,
                 kept: Optional[KeptEpoch] = None,
                 calibration: Optional[Dict] = None,
                 class_weighting: Optional[Dict] = None,
                 recalls: Optional[Dict] = None) -> Dict:
  """Assembles report.json's content.

  `images_per_second` maps each stage's name to its training throughput,
  measured over its steps after the first (which includes graph tracing).
  `speed` (speed.Switches.describe): the resolved speed switches, the
  stage-1 mode ("cached_features" or "images") and the peak RSS.
  `kept` (selection.BestWeights.best): the stage and 0-based epoch whose
  weights were kept, saved and exported, with their objective; None when
  no epoch was validated (the last weights are kept).
  `calibration` (train.calibrate): the temperature folded into the
  classifier and the validation figures before and after, or why there is
  none.
  `class_weighting` (weighting.ClassWeighting.describe): the training
  class counts, the weights or None, and why. `recalls`
  ({split: weighting.recall_report}): per-class recall and balanced
  accuracy of val, and test when there is one.
  """
  report = {
      "class_names": list(class_names),
      "num_examples": dict(num_examples),
      "skipped_files": list(skipped_files),
      "stages": [s.to_json() for s in stages],
      "val_accuracy": val_accuracy,
      "kept": None if kept is None else kept.to_json(),
      "export_path": export_path,
      "images_per_second": {s.name: s.images_per_second for s in stages},
      "seconds": seconds,
      "config": config,
  }
  if calibration is not None:
    report["calibration"] = calibration
  if test_accuracy is not None:
    report["test_accuracy"] = test_accuracy
  if class_weighting is not None:
    report["class_weighting"] = class_weighting
  for split, scores in (recalls or {}).items():
    report[f"{split}_per_class_recall"] = scores["per_class_recall"]
    report[f"{split}_balanced_accuracy"] = scores["balanced_accuracy"]
  if speed is not None:
    report["speed"] = speed
    report["stage1_mode"] = speed["stage1_mode"]
    report["peak_rss_mb"] = speed["peak_rss_mb"]
  return report


def write_report(workdir: str, report: Dict) -> str:
  """Writes WORKDIR/report.json atomically; returns its path."""
  path = os.path.join(workdir, REPORT_FILE)
  files.write_json_atomic(path, report)
  return path

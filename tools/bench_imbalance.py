"""Benchmark: `--class_weighting=auto` against `none` on imbalanced classes.

The far task of tools/bench_transfer.py (Fashion-MNIST classes 0-4, new to
the backbone, 32 px RGB PNGs), made imbalanced: 50, 25, 12, 6 and 3
training images for classes 0 to 4, balanced validation (`--val_per_class`,
from the training split too) and test (`--test_per_class`, from the test
split) sets. Each draw is one seed; each (draw, weighting) pair is one run
of the package with its defaults, in its own process. The figure is the
balanced accuracy (mean per-class recall) on test from report.json.

  python tools/bench_imbalance.py --workdir=/tmp/imbalance \\
      --backbone_weights=PATH/fm59_resnet50.weights.h5

The last lines are `auto: M +- SD` and `none: M +- SD` (test balanced
accuracy %, mean and sample standard deviation over the draws).
"""

import json
import os
import shutil
import sys
from typing import Dict, List

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bench_transfer  # noqa: E402  (its data helpers)
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined when the tool runs, not when tests import it."""
  flags.DEFINE_string("workdir", None, "Data, runs and results go here.")
  flags.DEFINE_string("backbone_weights", None, "The pretrained backbone "
                      "(.weights.h5), e.g. fm59_resnet50.weights.h5.")
  flags.DEFINE_string("fashion_mnist_dir",
                      bench_transfer.DEFAULT_FASHION_MNIST_DIR,
                      "Debian's dataset-fashion-mnist files.")
  flags.DEFINE_list("train_counts", ["50", "25", "12", "6", "3"],
                    "Training images of classes 0-4.")
  flags.DEFINE_integer("val_per_class", 100, "Validation images per class.")
  flags.DEFINE_integer("test_per_class", 1000, "Test images per class.")
  flags.DEFINE_integer("draws", 3, "Draws (seeds 0..N-1) of the task.")
  flags.DEFINE_list("weightings", ["auto", "none"],
                    "--class_weighting values.")
  flags.DEFINE_string("package_flags", "",
                      "More flags for every package run.")


CLASSES = bench_transfer.make_tasks(50, 100, 1000, 850)["far"].classes
DOMAIN = "fashion_mnist"


def prepare_draw(root: str, draw: int, train_counts: List[int],
                 val_per_class: int, test_per_class: int,
                 mnist_dir: str) -> str:
  """Writes one draw's train/val/test class folders (once); returns them.

  Validation images come from Fashion-MNIST's training split, disjoint
  from the training images; test images from its test split.
  """
  sizes = "-".join(map(str, train_counts))
  folder = os.path.join(root, f"far-imbalanced-draw{draw}-train{sizes}-val"
                        f"{val_per_class}-test{test_per_class}")
  if os.path.isdir(folder):
    return folder
  staging = folder + ".partial"
  shutil.rmtree(staging, ignore_errors=True)
  images, labels = bench_transfer.load_fashion_mnist(mnist_dir, "train")
  drawn = bench_transfer.stratified_draw(
      labels, CLASSES, [("train", max(train_counts)),
                        ("val", val_per_class)], [draw, 0])
  # The first n of each class's drawn training images, n from train_counts.
  rng = np.random.default_rng([draw, 1])
  train = np.sort(np.concatenate([
      rng.permutation(drawn["train"][labels[drawn["train"]] == c])[:n]
      for c, n in zip(CLASSES, train_counts)]))
  bench_transfer.write_pngs(os.path.join(staging, "train"), images, labels,
                            train, "train", DOMAIN)
  bench_transfer.write_pngs(os.path.join(staging, "val"), images, labels,
                            drawn["val"], "train", DOMAIN)
  images, labels = bench_transfer.load_fashion_mnist(mnist_dir, "t10k")
  test = bench_transfer.stratified_draw(
      labels, CLASSES, [("test", test_per_class)], [draw, 2])["test"]
  bench_transfer.write_pngs(os.path.join(staging, "test"), images, labels,
                            test, "t10k", DOMAIN)
  os.rename(staging, folder)
  return folder


def run_package(task_dir: str, run_dir: str, weighting: str,
                draw: int) -> Dict:
  """One package run with its defaults; the figures of its report.json."""
  workdir = os.path.join(run_dir, f"draw{draw}-{weighting}")
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(run_dir, exist_ok=True)
  command = bench_transfer.package_command(
      f"--dataset=folder:{task_dir}", f"--weights={FLAGS.backbone_weights}",
      f"--image_size={bench_transfer.IMAGE_SIZE}", f"--workdir={workdir}",
      f"--class_weighting={weighting}", f"--seed={draw}",
      *FLAGS.package_flags.split())
  error, seconds = bench_transfer.run_logged(command, workdir + ".log")
  row = {"draw": draw, "weighting": weighting, "seconds": seconds,
         "error": error}
  if error is None:
    with open(os.path.join(workdir, "report.json")) as f:
      report = json.load(f)
    row.update({key: report.get(key) for key in (
        "test_balanced_accuracy", "test_accuracy", "val_balanced_accuracy",
        "test_per_class_recall", "class_weighting", "kept")})
  return row


def summary(rows: List[Dict]) -> List[str]:
  lines = ["| weighting | test balanced accuracy % (mean +- sd) | per draw |",
           "| --- | --- | --- |"]
  finals = []
  for weighting in FLAGS.weightings:
    values = [100 * r["test_balanced_accuracy"] for r in rows
              if r["weighting"] == weighting and not r["error"]]
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    mean = float(np.mean(values)) if values else float("nan")
    lines.append(f"| {weighting} | {mean:.1f} +- {sd:.1f} | "
                 f"{', '.join(f'{v:.1f}' for v in values)} |")
    finals.append(f"{weighting}: {mean:.1f} +- {sd:.1f}")
  return lines + finals


def main(argv):
  del argv
  if not (FLAGS.workdir and FLAGS.backbone_weights):
    raise app.UsageError("--workdir and --backbone_weights are required.")
  counts = [int(n) for n in FLAGS.train_counts]
  if len(counts) != len(CLASSES) or min(counts) < 1:
    raise app.UsageError(f"--train_counts: {len(CLASSES)} counts >= 1.")
  rows = []
  for draw in range(FLAGS.draws):
    task_dir = prepare_draw(os.path.join(FLAGS.workdir, "data"), draw, counts,
                            FLAGS.val_per_class, FLAGS.test_per_class,
                            FLAGS.fashion_mnist_dir)
    for weighting in FLAGS.weightings:
      row = run_package(task_dir, os.path.join(FLAGS.workdir, "runs"),
                        weighting, draw)
      print(json.dumps({k: row.get(k) for k in (
          "draw", "weighting", "seconds", "test_balanced_accuracy",
          "test_accuracy", "error")}), flush=True)
      rows.append(row)
  with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print("\n".join(summary(rows)))


if __name__ == "__main__":
  define_flags()
  app.run(main)

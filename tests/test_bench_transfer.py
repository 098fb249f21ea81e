"""Pure functions of tools/bench_transfer.py: idx parsing, the stratified
draw, the summary lines. No ResNet50, no subprocess, no TensorFlow."""

import gzip
import importlib.util
import os
import struct

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_tool():
  """The tool as a module (tools/ is not a package); its flags are defined
  only when it runs as a script, so importing it defines none."""
  spec = importlib.util.spec_from_file_location(
      "bench_transfer", os.path.join(ROOT, "tools", "bench_transfer.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _load_tool()


def _write_idx(path, array, type_code=0x08):
  """An idx file as Fashion-MNIST's: magic, big-endian dimensions, bytes."""
  header = bytes([0, 0, type_code, array.ndim]) + struct.pack(
      f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_returns_images_and_labels_as_written(tmp_path):
  images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
  labels = np.array([9, 0, 4])
  _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
  _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
  got_images, got_labels = bench.load_fashion_mnist(str(tmp_path), "train")
  assert got_images.dtype == np.uint8 and got_images.shape == (3, 28, 28)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_rejects_other_types_and_truncated_files(tmp_path):
  path = str(tmp_path / "x.gz")
  _write_idx(path, np.zeros((2, 2)), type_code=0x0D)  # float32 code
  with pytest.raises(ValueError, match="unsigned bytes"):
    bench.read_idx(path)
  with gzip.open(path, "wb") as f:
    f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01" * 9)
  with pytest.raises(ValueError, match="header says"):
    bench.read_idx(path)


def test_missing_data_exits_with_the_install_command(tmp_path):
  with pytest.raises(SystemExit, match="apt-get update && apt-get install -y "
                     "dataset-fashion-mnist"):
    bench.require_fashion_mnist(str(tmp_path))


def test_stratified_draw_counts_disjoint_and_seeded():
  labels = np.repeat(np.arange(10), 30)[np.random.default_rng(1).permutation(
      300)]
  counts = [("train", 5), ("val", 10), ("test", 15)]
  draw = bench.stratified_draw(labels, (5, 6, 7, 8, 9), counts, [0, 1])
  for name, count in counts:
    assert np.all(np.diff(draw[name]) > 0)  # sorted, no repeats
    assert np.bincount(labels[draw[name]], minlength=10).tolist() == (
        [0] * 5 + [count] * 5)
  together = np.concatenate(list(draw.values()))
  assert len(np.unique(together)) == len(together) == 150
  again = bench.stratified_draw(labels, (5, 6, 7, 8, 9), counts, [0, 1])
  other = bench.stratified_draw(labels, (5, 6, 7, 8, 9), counts, [1, 1])
  assert all(np.array_equal(draw[n], again[n]) for n, _ in counts)
  assert not np.array_equal(draw["train"], other["train"])


def test_stratified_draw_refuses_more_than_a_class_holds():
  labels = np.array([0] * 4 + [1] * 9)
  with pytest.raises(ValueError, match="class 0 .* 4 images; 5 requested"):
    bench.stratified_draw(labels, (0, 1), [("train", 2), ("val", 3)], 0)


def test_task_plans_draw_far_test_from_the_test_split_and_near_all_from_it():
  assert bench.task_plan("far", 50, 100, 1000, 850) == [
      ("train", [("train", 50), ("val", 100)]), ("t10k", [("test", 1000)])]
  assert bench.task_plan("near", 50, 100, 1000, 850) == [
      ("t10k", [("train", 50), ("val", 100), ("test", 850)])]


def test_format_points_is_signed_with_one_decimal():
  assert bench.format_points(3.21) == "+3.2"
  assert bench.format_points(-0.46) == "-0.5"
  assert bench.format_points(-0.04) == "+0.0"
  assert bench.format_points(None) == "n/a"


def _row(test, seconds=10.0, error=None):
  return {"test_accuracy": test, "seconds": seconds, "error": error}


def test_summary_lines_end_with_the_fixed_lines():
  results = {
      "far": {"probe": _row(0.80), "seed": _row(0.75, 100.0),
              "defaults": _row(0.834, 40.0), "tune": _row(0.8567)},
      "near": {"probe": _row(0.95), "seed": _row(0.97, 100.0),
               "defaults": _row(0.94, 60.0)},
  }
  assert bench.summary_lines(results) == [
      "far_defaults_vs_seed: +8.4", "near_defaults_vs_seed: -3.0",
      "defaults_seconds_vs_seed: 0.50", "far_defaults_vs_probe: +3.4",
      "near_defaults_vs_probe: -1.0", "far_tuned: 85.7"]


def test_summary_lines_say_n_a_for_failed_or_missing_recipes():
  results = {"far": {"probe": _row(0.8), "defaults": _row(0.9),
                     "tune": _row(None, error="search: exit 2: nothing")}}
  assert bench.summary_lines(results) == [
      "far_defaults_vs_seed: n/a", "near_defaults_vs_seed: n/a",
      "defaults_seconds_vs_seed: n/a", "far_defaults_vs_probe: +10.0",
      "near_defaults_vs_probe: n/a", "far_tuned: n/a"]


def test_table_shows_failures_in_the_note_and_no_accuracy():
  results = {"far": {
      "probe": {**_row(0.8), "val_accuracy": 0.82, "C": 0.01},
      "seed": {**_row(0.7), "val_accuracy": 0.71, "head_test_accuracy": 0.65},
      "tune": {**_row(0.9), "val_accuracy": 0.9, "trials": 10,
               "search_space": {"dropout": [0.0, 0.5]},
               "best_hyperparameters": {"dropout": 0.1},
               "search_seconds": 100.0, "train_seconds": 20.0},
      "defaults": {**_row(None, 3.0, "exit 2: tf_finetune: error: a|b")}}}
  lines = bench.format_table(results).splitlines()
  assert lines[2] == "| far | probe | 80.0 | 82.0 |  | 10 | C=0.01 |"
  assert lines[3] == "| far | seed | 70.0 | 71.0 | 65.0 | 10 |  |"
  assert lines[4].startswith("| far | tune | 90.0 | 90.0 |  | 10 | 10 trials")
  assert lines[5] == ("| far | defaults |  |  |  | 3 | FAILED exit 2: "
                      "tf_finetune: error: a/b |")

"""Pure functions of tools/bench_transfer.py: idx parsing, the draws of the
tasks, the tables and summary lines over draws. No ResNet50, no subprocess,
no TensorFlow."""

import gzip
import struct

import numpy as np
import pytest

from conftest import load_tool, write_idx


bench = load_tool("bench_transfer")


def test_read_idx_returns_images_and_labels_as_written(tmp_path):
  images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
  labels = np.array([9, 0, 4])
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
  got_images, got_labels = bench.load_fashion_mnist(str(tmp_path), "train")
  assert got_images.dtype == np.uint8 and got_images.shape == (3, 28, 28)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_rejects_other_types_and_truncated_files(tmp_path):
  path = str(tmp_path / "x.gz")
  write_idx(path, np.zeros((2, 2)), type_code=0x0D)  # float32 code
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
  with pytest.raises(ValueError, match="class 0 has 4 images to draw from; "
                     "5 requested"):
    bench.stratified_draw(labels, (0, 1), [("train", 2), ("val", 3)], 0)


def _fake_labels():
  """Labels shaped like the real sources, shuffled: Fashion-MNIST's train
  split (fewer per class than the real 6,000, enough for the sizes), its
  test split (1,000 per class, as the real one), and digits with classes of
  unequal size as load_digits has (174-183)."""
  rng = np.random.default_rng(7)
  digits_counts = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
  return {
      "train": rng.permutation(np.repeat(np.arange(10), 200)),
      "t10k": rng.permutation(np.repeat(np.arange(10), 1000)),
      "all": rng.permutation(np.repeat(np.arange(10), digits_counts)),
  }


LABELS = _fake_labels()
TASKS = bench.make_tasks(train=50, val=100, far_test=1000, near_test=850)


def _per_class(split_draw, classes):
  source, indices = split_draw
  return np.bincount(LABELS[source][indices], minlength=10)[list(classes)]


def _images(draw):
  """Every drawn image as (source split, index)."""
  return [(source, int(i)) for source, indices in draw.values()
          for i in indices]


@pytest.mark.parametrize("name", bench.TASKS)
def test_draws_are_reproducible_differ_and_keep_the_test_images(name):
  task = TASKS[name]
  first = bench.draw_task(task, LABELS, draw_seed=0)
  again = bench.draw_task(task, LABELS, draw_seed=0)
  second = bench.draw_task(task, LABELS, draw_seed=1)
  for split in ("train", "val", "test"):
    assert first[split][0] == again[split][0] == second[split][0]
    np.testing.assert_array_equal(first[split][1], again[split][1])
  assert not np.array_equal(first["train"][1], second["train"][1])
  assert not np.array_equal(first["val"][1], second["val"][1])
  np.testing.assert_array_equal(first["test"][1], second["test"][1])


def test_far20_has_20_train_and_val_a_class_and_far_s_test_images():
  far20 = bench.draw_task(TASKS["far20"], LABELS, draw_seed=0)
  far = bench.draw_task(TASKS["far"], LABELS, draw_seed=0)
  classes = (0, 1, 2, 3, 4)
  assert _per_class(far20["train"], classes).tolist() == [20] * 5
  assert _per_class(far20["val"], classes).tolist() == [20] * 5
  assert _per_class(far20["test"], classes).tolist() == [1000] * 5
  assert far20["test"][0] == far["test"][0] == "t10k"
  np.testing.assert_array_equal(far20["test"][1], far["test"][1])
  images = _images(far20)
  assert len(set(images)) == len(images) == 5 * (20 + 20 + 1000)
  # Different draws of the same pool: far20 is not far's first images.
  assert not set(far20["train"][1]) <= set(far["train"][1])


def test_digits_has_10_train_and_val_a_class_and_the_rest_as_test():
  draw = bench.draw_task(TASKS["digits"], LABELS, draw_seed=0)
  classes = tuple(range(10))
  counts = np.bincount(LABELS["all"], minlength=10)
  assert _per_class(draw["train"], classes).tolist() == [10] * 10
  assert _per_class(draw["val"], classes).tolist() == [10] * 10
  # A fixed pool of 50 a class for train and val, the rest as test.
  assert _per_class(draw["test"], classes).tolist() == (counts - 50).tolist()
  images = _images(draw)
  assert len(set(images)) == len(images) == len(LABELS["all"]) - 10 * 30
  pools = {seed: set(np.concatenate([
      bench.draw_task(TASKS["digits"], LABELS, seed)[s][1]
      for s in ("train", "val")])) for seed in range(5)}
  test = set(draw["test"][1])
  assert all(not pool & test for pool in pools.values())
  assert len(set.union(*pools.values())) <= 10 * 50


def test_near_draws_train_and_val_from_the_images_left_after_its_test():
  draw = bench.draw_task(TASKS["near"], LABELS, draw_seed=3)
  assert _per_class(draw["test"], bench.SOURCE_CLASSES).tolist() == [850] * 5
  images = _images(draw)
  assert len(set(images)) == len(images) == 5 * 1000
  too_many = bench.make_tasks(100, 100, 1000, 850)["near"]
  with pytest.raises(ValueError, match="class 5 has 150 images to draw from; "
                     "200 requested"):
    bench.draw_task(too_many, LABELS, draw_seed=0)


def test_digits_pixels_scale_to_bytes_and_the_loader_gives_all_images():
  np.testing.assert_array_equal(
      bench.digits_to_uint8(np.array([[0.0, 8.0, 16.0]])), [[0, 128, 255]])
  images, labels = bench.load_digits()
  assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
  assert images.max() == 255 and sorted(set(labels.tolist())) == list(
      range(10))


def test_a_draw_s_folder_is_reused_and_others_get_their_own(tmp_path):
  task = TASKS["far20"]

  def must_not_load(domain, split):
    raise AssertionError(f"loaded {domain} {split}: the folder is there")

  folder = tmp_path / task.folder_name(2)
  folder.mkdir()
  assert bench.prepare_task(task, 2, str(tmp_path), must_not_load) == str(
      folder)
  names = {t.folder_name(seed) for t in TASKS.values() for seed in (0, 1)}
  assert len(names) == 2 * len(TASKS)

def test_format_points_is_signed_with_one_decimal():
  assert bench.format_points(3.21) == "+3.2"
  assert bench.format_points(-0.46) == "-0.5"
  assert bench.format_points(-0.04) == "+0.0"
  assert bench.format_points(None) == "n/a"


def _rows(val, test, seconds=None, errors=(), **extra):
  """A recipe's rows over draws 0, 1, 2...; draws in `errors` failed."""
  seconds = seconds or [10.0] * len(val)
  return [{"draw_seed": d, "seconds": seconds[d], **extra,
           **({"error": "exit 1: boom|bang", "val_accuracy": None,
               "test_accuracy": None} if d in errors else
              {"error": None, "val_accuracy": v, "test_accuracy": t})}
          for d, (v, t) in enumerate(zip(val, test))]


def _results():
  """Val and test accuracies chosen so that means, sds and differences are
  exact at one decimal (in points)."""
  return {
      "far": {
          "probe": [{**row, "C": c} for row, c in zip(
              _rows([0.70, 0.72, 0.74], [0.60, 0.62, 0.64]), (1, 3.16228, 1))],
          "seed": _rows([0.60, 0.60, 0.60], [0.55, 0.55, 0.55],
                        [100.0, 100.0, 100.0], head_test_accuracy=0.5),
          "head": _rows([0.75, 0.76, 0.80], [0.61, 0.63, 0.68],
                        stage1_mode="cached_features"),
          "defaults": _rows([0.78, 0.80, 0.82], [0.66, 0.66, 0.66],
                            [40.0, 50.0, 60.0],
                            stage1_mode="cached_features"),
          "tune": _rows([0.81, 0.83, 0.85], [0.70, 0.71, 0.72],
                        errors=(2,), trials=10, search_space={"lr": [1, 2]},
                        best_hyperparameters={"lr": 1}, search_seconds=8.0,
                        peak_rss_mb=[900.0, 1000.0]),
      },
      "near": {
          "probe": _rows([0.90, 0.90, 0.90], [0.92, 0.92, 0.92], C=0.01),
          "seed": _rows([0.91, 0.91, 0.91], [0.90, 0.90, 0.90],
                        [60.0, 60.0, 60.0]),
          "head": _rows([0.95, 0.99, 0.93], [0.93, 0.91, 0.95], errors=(1,),
                        stage1_mode="cached_features"),
          "defaults": _rows([0.92, 0.93, 0.94], [0.91, 0.92, 0.93],
                            [45.0, 45.0, 45.0]),
      },
  }


def test_mean_sd_is_numpy_s_mean_and_sample_sd():
  values = [0.70, 0.72, 0.79]
  mean, sd = bench.mean_sd(values)
  assert mean == pytest.approx(np.mean(values))
  assert sd == pytest.approx(np.std(values, ddof=1))
  assert bench.mean_sd([0.5]) == (0.5, None)
  assert bench.mean_sd([]) == (None, None)
  assert bench.format_mean_sd([0.70, 0.72, 0.74]) == "72.0 ± 2.0"
  assert bench.format_mean_sd([0.7]) == "70.0"


def test_summary_lines_are_means_over_draws_on_the_split_asked():
  results = _results()
  assert bench.summary_lines(results, "val") == [
      "far_defaults_vs_seed: +20.0", "near_defaults_vs_seed: +2.0",
      "far_head_vs_probe: +5.0", "near_head_vs_probe: n/a",
      "far_tune_vs_defaults: n/a", "near_tune_vs_defaults: n/a",
      "far_defaults_vs_probe: +8.0", "near_defaults_vs_probe: +3.0",
      "far_tuned: n/a"]
  assert bench.summary_lines(results, "test", suffix="_test") == [
      "far_defaults_vs_seed_test: +11.0", "near_defaults_vs_seed_test: +2.0",
      "far_head_vs_probe_test: +2.0", "near_head_vs_probe_test: n/a",
      "far_tune_vs_defaults_test: n/a", "near_tune_vs_defaults_test: n/a",
      "far_defaults_vs_probe_test: +4.0", "near_defaults_vs_probe_test: +0.0",
      "far_tuned_test: n/a"]
  assert bench.seconds_lines(results) == [
      "far_defaults_seconds_vs_seed: 0.50",
      "near_defaults_seconds_vs_seed: 0.75",
      "far_tune_seconds_vs_defaults: n/a",
      "near_tune_seconds_vs_defaults: n/a"]


def test_a_recipe_that_succeeded_on_every_draw_has_a_tuned_line():
  results = {"far": {"tune": _rows([0.81, 0.83, 0.85], [0.70, 0.71, 0.72],
                                   [400.0, 300.0, 500.0]),
                     "defaults": _rows([0.80, 0.83, 0.83], [0.71, 0.71, 0.70],
                                       [100.0, 100.0, 100.0])}}
  assert bench.summary_lines(results, "val")[-1] == "far_tuned: 83.0"
  assert bench.summary_lines(results, "test", "_test")[-1] == (
      "far_tuned_test: 71.0")
  # The search against the defaults it starts from: per-draw differences
  # of accuracy, mean seconds over mean seconds.
  assert "far_tune_vs_defaults: +1.0" in bench.summary_lines(results, "val")
  assert "far_tune_vs_defaults_test: +0.3" in bench.summary_lines(
      results, "test", "_test")
  assert "far_tune_seconds_vs_defaults: 4.00" in bench.seconds_lines(results)


def test_decision_table_is_on_its_split_and_counts_failed_draws():
  lines = bench.decision_table(_results(), "val").splitlines()
  assert lines[0].startswith("| task | recipe | val % (mean ± sd) |")
  assert lines[2] == ("| far | probe | 72.0 ± 2.0 | 10 | 3/3 | C=1 / "
                      "C=3.16228 / C=1 |")
  assert lines[5] == ("| far | defaults | 80.0 ± 2.0 | 50 | 3/3 | stage 1 on "
                      "cached_features |")
  # Two draws of three succeeded: their mean and sd, and the failure shown.
  assert lines[6].startswith("| far | tune | 82.0 ± 1.4 | 10 | 2/3 | ")
  assert "FAILED draw 2: exit 1: boom/bang" in lines[6]
  assert lines[9] == ("| near | head | 94.0 ± 1.4 | 10 | 2/3 | stage 1 on "
                      "cached_features / FAILED draw 1: exit 1: boom/bang / "
                      "stage 1 on cached_features |")


def test_test_table_has_val_and_test_mean_and_sd():
  lines = bench.test_table(_results()).splitlines()
  assert lines[0] == ("| task | recipe | val % | test % | head-only test % | "
                      "seconds | draws ok |")
  assert lines[2] == "| far | probe | 72.0 ± 2.0 | 62.0 ± 2.0 |  | 10 | 3/3 |"
  assert lines[3] == ("| far | seed | 60.0 ± 0.0 | 55.0 ± 0.0 | 50.0 ± 0.0 | "
                      "100 | 3/3 |")


def test_report_decides_on_val_and_ends_with_the_test_figures():
  text, summary = bench.report(_results(), "val")
  assert summary["decide_on"] == "val"
  assert summary["decisions"]["far_head_vs_probe"] == "+5.0"
  assert summary["decisions"]["near_defaults_seconds_vs_seed"] == "0.75"
  assert summary["test"]["far_head_vs_probe_test"] == "+2.0"
  assert text.index("| val % (mean ± sd) |") < text.index(
      "far_head_vs_probe: +5.0") < text.index("| test % |")
  assert text.splitlines()[-1] == "far_tuned_test: n/a"
  _, on_test = bench.report(_results(), "test")
  assert on_test["decisions"]["far_head_vs_probe"] == "+2.0"


def test_aggregates_keep_means_and_sds_per_recipe():
  entry = bench.aggregates(_results())["far"]["tune"]
  assert entry["draws"] == 3 and entry["draws_ok"] == 2
  assert entry["val_mean"] == pytest.approx(0.82)
  assert entry["test_sd"] == pytest.approx(np.std([0.70, 0.71], ddof=1))

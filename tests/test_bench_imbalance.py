"""tools/bench_imbalance.py's task draw, on a small fake Fashion-MNIST."""

import os

import numpy as np

from conftest import load_tool, write_idx


bench = load_tool("bench_imbalance")


def _fake_fashion_mnist(folder, per_class):
  """Both splits, `per_class` images of each of the 10 classes."""
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  for split in ("train", "t10k"):
    labels = np.repeat(np.arange(10), per_class)
    images = rng.integers(0, 256, (len(labels), 28, 28))
    write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), labels)
  return folder


def _listing(folder):
  return {split: {name: sorted(os.listdir(os.path.join(folder, split, name)))
                  for name in sorted(os.listdir(os.path.join(folder, split)))}
          for split in ("train", "val", "test")}


def test_draw_has_the_imbalanced_train_and_balanced_val_and_test(tmp_path):
  mnist = _fake_fashion_mnist(str(tmp_path / "mnist"), 12)
  counts = [5, 3, 2, 1, 1]
  folder = bench.prepare_draw(str(tmp_path / "data"), 0, counts, 4, 3, mnist)
  listing = _listing(folder)
  assert [len(files) for files in listing["train"].values()] == counts
  assert [len(files) for files in listing["val"].values()] == [4] * 5
  assert [len(files) for files in listing["test"].values()] == [3] * 5
  for name, train_files in listing["train"].items():
    assert not set(train_files) & set(listing["val"][name])
  # Another draw draws other images; the same draw is reused as written.
  other = bench.prepare_draw(str(tmp_path / "data"), 1, counts, 4, 3, mnist)
  assert _listing(other)["train"] != listing["train"]
  assert bench.prepare_draw(str(tmp_path / "data"), 0, counts, 4, 3,
                            mnist) == folder

"""Benchmark: transfer to real images, the package's recipe judged over draws.

A ResNet50 pretrained here on Fashion-MNIST classes 5-9 (sandal, shirt,
sneaker, bag, ankle boot) is transferred to small tasks of real images,
32 px RGB PNGs made as the backbone saw its own (bilinear resize, gray
copied to RGB):

  far     Fashion-MNIST classes 0-4 (t-shirt, trouser, pullover, dress,
          coat), new to the backbone: 50 train + 100 val per class from the
          training split; test: the test split's 1,000 per class.
  far20   far with 20 train + 20 val per class (few-shot); the same test.
  near    classes 5-9 from the test split, images the backbone never saw of
          classes it knows: 850 test per class, 50 train + 100 val drawn
          from the other 150. With these sizes every draw splits the same
          150 images per class anew between train and val.
  digits  another domain: scikit-learn's bundled handwritten digits
          (`load_digits`: 1,797 8x8 images, 10 classes), upscaled to 32 px
          RGB alike: 10 train + 10 val per class drawn from a fixed pool of
          50 per class, the other 1,297 images as test.

Draws: `--draws=N` draws of the train and val images, draw d with seed
`--seed` + d; the test images are the same in every draw and invocation (a
fixed seed per task; far and far20 share theirs). The package and the seed
recipe keep their own training seeds, so draws differ only in the images.

Each task and draw is learned by up to five recipes, each in its own Python
process:

  probe     linear probe: logistic regression on the frozen backbone's pooled
            features, C picked on val. What the backbone alone is worth.
  seed      the seed blog's recipe in plain Keras: frozen backbone, GAP ->
            Dense(128, relu) -> Dense(classes), Adam 1e-3 for 10 epochs;
            unfreeze `base_model.layers[100:]`, Adam 1e-5 for 10 more.
  head      the package's defaults with --finetune_epochs=0: stage head only.
  defaults  `python -m tf_finetune.main` with every flag at its default but
            --dataset, --weights, --image_size and --workdir.
  tune      `--mode=tune` with the same flags (the package's own search
            space and tuner); the model it keeps (WORKDIR/best/).

Seconds are wall clock of the recipe's processes, start to exit: Python and
TensorFlow start-up, data loading, model build, training, evaluation (and
the package's export and report) all count, alike for every recipe.

Which split decides: validation accuracy (`--decide_on=val`, the default).
The first table and the summary lines after it (means over the draws) are
on that split and are what to choose recipes and defaults by; the test
accuracies come last, in their own table and `_test` lines, to report the
chosen recipe's result, not to choose by it (choosing by test would fit the
choice to the test images).

  python tools/bench_transfer.py --workdir=/tmp/transfer \\
      --backbone_weights=PATH/fm59_resnet50.weights.h5

After the decision table: `TASK_defaults_seconds_vs_seed: R` and
`TASK_tune_seconds_vs_defaults: R` (mean seconds of one recipe / the other
on that task), then `TASK_defaults_vs_seed: +P`, `TASK_head_vs_probe: +P`,
`TASK_tune_vs_defaults: +P`, `TASK_defaults_vs_probe: +P` and `far_tuned: A`
(% of the tuned recipe), all on the decision split; points are accuracy
points, the mean over draws of the per-draw differences, "n/a" unless both
recipes succeeded on every draw. Then the test table and the same accuracy
lines on test, named `..._test`. `--make_source=PATH` pretrains such a backbone first (the recipe of
`pretrain_source`, ~45 min on 2 cores) and uses it. Data: Debian's
dataset-fashion-mnist package (`--fashion_mnist_dir`) and scikit-learn.
Everything, each draw's figures included, is also written as JSON
(`--output_json`).
"""

import dataclasses
import functools
import gzip
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
# Labels 0-9 of each domain; class folders are named "LABEL_NAME" so that
# sorting them (as every loader does) keeps the label order.
CLASS_NAMES = {
    "fashion_mnist": ("t-shirt_top", "trouser", "pullover", "dress", "coat",
                      "sandal", "shirt", "sneaker", "bag", "ankle_boot"),
    "digits": ("zero", "one", "two", "three", "four", "five", "six", "seven",
               "eight", "nine")}
SOURCE_CLASSES = (5, 6, 7, 8, 9)
TASKS = ("far", "far20", "near", "digits")
RECIPES = ("probe", "seed", "head", "defaults", "tune")
SPLITS = ("val", "test")
IMAGE_SIZE = 32  # The backbone's pretraining size.
# Half decades from 1e-3 to 1e3: the probe's regularisation candidates.
PROBE_C_GRID = tuple(float(10.0 ** (e / 2)) for e in range(-6, 7))
LOG_TAIL_LINES = 15
# Any constant: a task's test images must not change with --seed or the
# draw, so that every draw and every run is scored on the same images.
TEST_DRAW_SEED = 20261207
DIGITS_MAX = 16  # load_digits' pixels are counts 0-16 of a 4x4 block.


def define_flags() -> None:
  """Defines the tool's flags.

  Called only when the file runs as a script: tests import it next to
  `tf_finetune.main`, whose --workdir, --seed and --dataset would clash.
  """
  flags.DEFINE_string("workdir", "", "Output folder; empty: a new temporary "
                      "folder. Task folders found there with the same sizes "
                      "and draw seed are reused.")
  flags.DEFINE_string("fashion_mnist_dir", DEFAULT_FASHION_MNIST_DIR,
                      "Folder of the Fashion-MNIST idx files "
                      f"(`{INSTALL_HINT}`).")
  flags.DEFINE_string("backbone_weights", "", "A ResNet50(include_top=False, "
                      "input_shape=(32, 32, 3)) .weights.h5 pretrained on "
                      "Fashion-MNIST classes 5-9; required unless "
                      "--make_source.")
  flags.DEFINE_string("make_source", "", "Pretrain such a backbone first, "
                      "save it to this .weights.h5 path and use it.")
  flags.DEFINE_integer("make_source_images", 30000, "Training-split images "
                       "of classes 5-9 --make_source trains on (30,000: all; "
                       "fewer only to try the tool).")
  flags.DEFINE_integer("make_source_epochs", 3, "Epochs of --make_source.")
  flags.DEFINE_list("tasks", list(TASKS), f"Subset of {TASKS}.")
  flags.DEFINE_list("recipes", list(RECIPES), f"Subset of {RECIPES}.")
  flags.DEFINE_integer("seed", 0, "Seed of the first image draw (draw d uses "
                       "seed+d) and the training seed of the probe and seed "
                       "recipes (the package keeps its own).")
  flags.DEFINE_integer("draws", 3, "Independent draws of the train and val "
                       "images every recipe runs on; the test images stay.",
                       lower_bound=1)
  flags.DEFINE_enum("decide_on", "val", list(SPLITS), "The split of the "
                    "first table and summary lines, which decisions go by; "
                    "test figures follow in their own table.")
  flags.DEFINE_integer("train_per_class", 50, "Train images per class of far "
                       "and near.")
  flags.DEFINE_integer("val_per_class", 100, "Val images per class of far "
                       "and near.")
  flags.DEFINE_integer("far_test_per_class", 1000, "Test images per class of "
                       "far and far20, from the test split (1,000: all).")
  flags.DEFINE_integer("near_test_per_class", 850, "Test images per class of "
                       "task near; train and val are drawn from the rest "
                       "(the test split has 1,000 per class).")
  flags.DEFINE_integer("seed_epochs", 10, "Epochs of each stage of the seed "
                       "recipe.")
  flags.DEFINE_string("package_flags", "", "Extra flags for the package's "
                      "runs (head, defaults and tune), split like a shell "
                      "does.")
  flags.DEFINE_string("output_json", "", "Results file; empty: "
                      "WORKDIR/results.json.")
  flags.DEFINE_enum("run_recipe", None, ["probe", "seed", "source"],
                    "Internal: run one recipe in this process.")
  flags.DEFINE_string("task_dir", "", "Internal: the recipe's data folder.")
  flags.DEFINE_string("result_json", "", "Internal: the recipe's result.")
  flags.register_validator("tasks", lambda v: set(v) <= set(TASKS),
                           f"--tasks: expected a subset of {TASKS}.")
  flags.register_validator("recipes", lambda v: set(v) <= set(RECIPES),
                           f"--recipes: expected a subset of {RECIPES}.")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the driver's functions need of the flags, read once in main()."""
  seed: int = 0
  draws: int = 3
  decide_on: str = "val"
  seed_epochs: int = 10
  package_flags: str = ""
  make_source: str = ""
  make_source_images: int = 30000
  make_source_epochs: int = 3

  @property
  def draw_seeds(self) -> List[int]:
    return [self.seed + d for d in range(self.draws)]


# ------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Task:
  """Where a task's images come from and how many of each class it takes.

  A fixed draw (seeded by `test_key`, the same in every draw and run) takes
  `fixed` images per class from `test_split`. They are the test images,
  unless `fixed_is_pool`: then they are the only candidates for train and
  val, and the rest of the split's images of the classes are the test.
  Train and val are drawn anew each draw from `pool_split`, never from the
  test images.
  """
  name: str
  domain: str  # "fashion_mnist" or "digits"
  classes: Tuple[int, ...]
  train: int
  val: int
  pool_split: str
  test_split: str
  fixed: int
  fixed_is_pool: bool = False
  test_key: int = 0  # Tasks with the same key and splits share test images.
  draw_key: int = 0  # Makes the draws of the tasks independent.

  def folder_name(self, draw_seed: int) -> str:
    """Names everything the folder's images depend on, so that a folder
    found under this name can be reused."""
    fixed = f"pool{self.fixed}" if self.fixed_is_pool else f"test{self.fixed}"
    return (f"{self.name}-draw{draw_seed}-train{self.train}-val{self.val}-"
            f"{fixed}")


def make_tasks(train: int, val: int, far_test: int,
               near_test: int) -> Dict[str, Task]:
  """The tasks by name; `train`, `val` are far's and near's sizes."""
  far_classes = (0, 1, 2, 3, 4)
  return {
      "far": Task("far", "fashion_mnist", far_classes, train, val, "train",
                  "t10k", far_test, test_key=0, draw_key=0),
      "far20": Task("far20", "fashion_mnist", far_classes, 20, 20, "train",
                    "t10k", far_test, test_key=0, draw_key=4),
      "near": Task("near", "fashion_mnist", SOURCE_CLASSES, train, val,
                   "t10k", "t10k", near_test, test_key=1, draw_key=1),
      "digits": Task("digits", "digits", tuple(range(10)), 10, 10, "all",
                     "all", 50, fixed_is_pool=True, test_key=3, draw_key=3),
  }


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped idx file of unsigned bytes (Fashion-MNIST's format).

  Layout: two zero bytes, the type code 0x08 (uint8), the number of
  dimensions, each dimension as a big-endian uint32, then the data.

  Raises:
    ValueError: not an idx file of uint8, or truncated.
  """
  with gzip.open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
    raise ValueError(f"{path}: not an idx file of unsigned bytes.")
  ndim = raw[3]
  start = 4 + 4 * ndim
  shape = struct.unpack(f">{ndim}I", raw[4:start])
  if len(raw) - start != int(np.prod(shape)):
    raise ValueError(f"{path}: holds {len(raw) - start} bytes of data; its "
                     f"header says {shape}.")
  return np.frombuffer(raw, np.uint8, offset=start).reshape(shape)


def fashion_mnist_path(folder: str, split: str, kind: str) -> str:
  """The idx file of `split` ("train" or "t10k"), `kind` "images"/"labels"."""
  suffix = "images-idx3" if kind == "images" else "labels-idx1"
  return os.path.join(folder, f"{split}-{suffix}-ubyte.gz")


def require_fashion_mnist(folder: str) -> None:
  """Exits with how to install the data when any of its files is missing."""
  paths = [fashion_mnist_path(folder, split, kind)
           for split in ("train", "t10k") for kind in ("images", "labels")]
  missing = [path for path in paths if not os.path.isfile(path)]
  if missing:
    sys.exit(f"bench_transfer: Fashion-MNIST not found: {', '.join(missing)} "
             f"missing. Install it with `{INSTALL_HINT}` (Debian/Ubuntu), or "
             "point --fashion_mnist_dir at a folder holding the four "
             "*-ubyte.gz files.")


def load_fashion_mnist(folder: str, split: str) -> Tuple[np.ndarray,
                                                         np.ndarray]:
  """(images [N, 28, 28] uint8, labels [N] uint8) of one split."""
  images = read_idx(fashion_mnist_path(folder, split, "images"))
  labels = read_idx(fashion_mnist_path(folder, split, "labels"))
  if images.ndim != 3 or labels.shape != images.shape[:1]:
    raise ValueError(f"{folder}: {split} images {images.shape} and labels "
                     f"{labels.shape} do not match.")
  return images, labels


def digits_to_uint8(images: np.ndarray) -> np.ndarray:
  """load_digits' pixels (0-16, ink high) as 0-255 bytes, ink bright on a
  dark ground as in Fashion-MNIST."""
  return np.round(np.asarray(images, np.float64) * (255 / DIGITS_MAX)).astype(
      np.uint8)


def load_digits() -> Tuple[np.ndarray, np.ndarray]:
  """(images [1797, 8, 8] uint8, labels [1797]) of scikit-learn's bundled
  handwritten digits (no download)."""
  from sklearn.datasets import load_digits as sklearn_load_digits
  bunch = sklearn_load_digits()
  return digits_to_uint8(bunch.images), bunch.target.astype(np.uint8)


def load_source(domain: str, split: str,
                fashion_mnist_dir: str) -> Tuple[np.ndarray, np.ndarray]:
  """(images, labels) of one split of a domain ("all" for digits)."""
  if domain == "digits":
    return load_digits()
  return load_fashion_mnist(fashion_mnist_dir, split)


def stratified_draw(labels: np.ndarray, classes: Sequence[int],
                    counts: Sequence[Tuple[str, int]], seed,
                    among: Optional[np.ndarray] = None
                    ) -> Dict[str, np.ndarray]:
  """Draws disjoint, per-class sets of indices of `labels`.

  Args:
    labels: the label of every image of one source split.
    classes: the labels to draw from.
    counts: (name, images per class) of each set, e.g. [("train", 50),
      ("val", 100)].
    seed: anything `np.random.default_rng` takes; the same seed gives the
      same draw.
    among: indices of `labels` to draw from; None: all.

  Returns:
    {name: sorted indices}, `count` of each class per set.

  Raises:
    ValueError: a class has fewer images than the sets need together.
  """
  rng = np.random.default_rng(seed)
  candidates = np.zeros(len(labels), bool)
  candidates[np.arange(len(labels)) if among is None else among] = True
  needed = sum(count for _, count in counts)
  drawn = {name: [] for name, _ in counts}
  for label in classes:
    pool = np.flatnonzero((labels == label) & candidates)
    if len(pool) < needed:
      raise ValueError(f"class {label} has {len(pool)} images to draw from; "
                       f"{needed} requested "
                       f"({', '.join(f'{n} {c}' for n, c in counts)}).")
    order = rng.permutation(pool)
    start = 0
    for name, count in counts:
      drawn[name].append(order[start:start + count])
      start += count
  return {name: np.sort(np.concatenate(parts)) for name, parts in drawn.items()}


def draw_task(task: Task, labels: Dict[str, np.ndarray],
              draw_seed: int) -> Dict[str, Tuple[str, np.ndarray]]:
  """One draw of a task's images.

  Args:
    task: the task.
    labels: {source split: the label of each of its images}.
    draw_seed: the draw's seed; the test images do not depend on it.

  Returns:
    {"train" | "val" | "test": (source split, sorted indices into it)}.

  Raises:
    ValueError: a class has too few images for the sizes.
  """
  test_labels = labels[task.test_split]
  fixed = stratified_draw(test_labels, task.classes, [("fixed", task.fixed)],
                          [TEST_DRAW_SEED, task.test_key])["fixed"]
  rest = np.setdiff1d(np.flatnonzero(np.isin(test_labels, task.classes)),
                      fixed)
  if task.fixed_is_pool:
    test, among = rest, fixed
  else:
    test, among = fixed, rest if task.pool_split == task.test_split else None
  drawn = stratified_draw(labels[task.pool_split], task.classes,
                          [("train", task.train), ("val", task.val)],
                          [draw_seed, task.draw_key], among=among)
  return {"train": (task.pool_split, drawn["train"]),
          "val": (task.pool_split, drawn["val"]),
          "test": (task.test_split, test)}


def class_folder_name(domain: str, label: int) -> str:
  return f"{label}_{CLASS_NAMES[domain][label]}"


def resize_to_rgb(images: np.ndarray) -> np.ndarray:
  """[N, H, W] gray -> [N, 32, 32, 3] uint8, as the backbone was pretrained:
  bilinear `tf.image.resize`, rounded and clipped, gray copied to RGB."""
  import tensorflow as tf
  resized = tf.image.resize(images[..., None].astype(np.float32),
                            (IMAGE_SIZE, IMAGE_SIZE), method="bilinear")
  gray = np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)
  return np.repeat(gray, 3, axis=-1)


def write_pngs(folder: str, images: np.ndarray, labels: np.ndarray,
               indices: np.ndarray, prefix: str, domain: str) -> None:
  """Writes images[indices] as FOLDER/LABEL_NAME/PREFIX-INDEX.png.

  The file name keeps the image's index in its source split, so every PNG
  can be traced back to its source.
  """
  import tensorflow as tf
  pixels = resize_to_rgb(images[indices])
  for index, rgb in zip(indices, pixels):
    class_dir = os.path.join(folder,
                             class_folder_name(domain, int(labels[index])))
    os.makedirs(class_dir, exist_ok=True)
    with open(os.path.join(class_dir, f"{prefix}-{index:05d}.png"), "wb") as f:
      f.write(tf.io.encode_png(rgb).numpy())


Loader = Callable[[str, str], Tuple[np.ndarray, np.ndarray]]


def prepare_task(task: Task, draw_seed: int, data_root: str,
                 load: Loader) -> str:
  """Writes one draw's train/val/test class folders (once); returns them.

  Args:
    task: the task.
    draw_seed: the draw's seed.
    data_root: the folder to write the task folder in.
    load: (domain, source split) -> (images, labels).

  The folder's name holds the draw seed and the sizes, so a folder found
  under that name was drawn with the same settings and is reused. It is
  written under another name and renamed when complete: an interrupted run
  leaves no half folder to reuse.
  """
  folder = os.path.join(data_root, task.folder_name(draw_seed))
  if os.path.isdir(folder):
    print(f"{task.name}: reusing {folder}", flush=True)
    return folder
  sources = {split: load(task.domain, split)
             for split in {task.pool_split, task.test_split}}
  draw = draw_task(task, {split: labels for split, (_, labels)
                          in sources.items()}, draw_seed)
  staging = folder + ".partial"
  shutil.rmtree(staging, ignore_errors=True)
  for split, (source, indices) in draw.items():
    images, labels = sources[source]
    write_pngs(os.path.join(staging, split), images, labels, indices,
               source if task.domain == "fashion_mnist" else task.domain,
               task.domain)
  os.rename(staging, folder)
  print(f"{task.name}: wrote {folder}", flush=True)
  return folder


def prepare_source(data_root: str, mnist_dir: str, images: int,
                   seed: int) -> str:
  """Class folders of `images` training-split images of classes 5-9, the
  pretraining data (all 30,000 by default; fewer are a stratified draw)."""
  folder = os.path.join(data_root, f"source-seed{seed}-images{images}")
  if os.path.isdir(folder):
    return folder
  all_images, labels = load_fashion_mnist(mnist_dir, "train")
  per_class = images // len(SOURCE_CLASSES)
  # Key 2, no task's draw_key: the source draw stays the one the shared
  # backbone's data was drawn with.
  draw = stratified_draw(labels, SOURCE_CLASSES, [("source", per_class)],
                         [seed, 2])
  staging = folder + ".partial"
  shutil.rmtree(staging, ignore_errors=True)
  write_pngs(staging, all_images, labels, draw["source"], "train",
             "fashion_mnist")
  os.rename(staging, folder)
  return folder


# ------------------------------------------- recipes run in this process


def load_split(task_dir: str, split: str, batch_size: int, shuffle: bool,
               seed: int = 0):
  """(preprocessed images, int labels) batches of one split's class folders.

  Caffe preprocessing (`resnet50.preprocess_input`) as the package's model
  applies it and as the backbone was pretrained.
  """
  import keras
  import tensorflow as tf
  dataset = keras.utils.image_dataset_from_directory(
      os.path.join(task_dir, split), image_size=(IMAGE_SIZE, IMAGE_SIZE),
      batch_size=batch_size, label_mode="int", shuffle=shuffle, seed=seed)
  dataset = dataset.map(
      lambda x, y: (keras.applications.resnet50.preprocess_input(x), y),
      num_parallel_calls=tf.data.AUTOTUNE)
  # Train is reshuffled every epoch; the others are read many times alike.
  return (dataset if shuffle else dataset.cache()).prefetch(tf.data.AUTOTUNE)


def load_backbone(weights: str):
  """ResNet50(include_top=False) at 32 px with the weights of `weights`."""
  import keras
  backbone = keras.applications.ResNet50(
      include_top=False, weights=None,
      input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
  backbone.load_weights(weights)
  return backbone


def pooled_features(extractor, dataset) -> Tuple[np.ndarray, np.ndarray]:
  """(features, labels) of every batch of `dataset`, in order."""
  features, labels = [], []
  for images, batch_labels in dataset:
    features.append(np.asarray(extractor(images, training=False)))
    labels.append(batch_labels.numpy())
  return np.concatenate(features), np.concatenate(labels)


def run_probe(task_dir: str, weights: str) -> Dict:
  """Logistic regression on the frozen backbone's pooled features.

  C is the grid value with the best val accuracy (the smallest on a tie:
  the most regularised of the equals); the model is then refit on train.
  """
  import keras
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  start = time.perf_counter()
  backbone = load_backbone(weights)
  extractor = keras.Model(
      backbone.input, keras.layers.GlobalAveragePooling2D()(backbone.output))
  data = {split: pooled_features(extractor, load_split(task_dir, split, 64,
                                                       shuffle=False))
          for split in ("train", "val", "test")}
  feature_seconds = time.perf_counter() - start
  # Standardised on train: lbfgs converges in far fewer steps on features
  # of one scale, and C means the same for every backbone.
  scaler = StandardScaler().fit(data["train"][0])
  x = {split: scaler.transform(f) for split, (f, _) in data.items()}
  y = {split: labels for split, (_, labels) in data.items()}

  def fit(c):
    return LogisticRegression(C=c, max_iter=10000).fit(x["train"], y["train"])

  val_by_c = {c: fit(c).score(x["val"], y["val"]) for c in PROBE_C_GRID}
  best_c = max(PROBE_C_GRID, key=lambda c: (val_by_c[c], -c))
  final = fit(best_c)
  return {"test_accuracy": final.score(x["test"], y["test"]),
          "val_accuracy": val_by_c[best_c], "C": best_c,
          "val_accuracy_by_C": {f"{c:g}": a for c, a in val_by_c.items()},
          "feature_dim": int(x["train"].shape[1]),
          "feature_seconds": feature_seconds,
          "recipe_seconds": time.perf_counter() - start}


def run_seed_recipe(task_dir: str, weights: str, seed: int,
                    epochs: int) -> Dict:
  """The seed blog's two stages, plainly: frozen backbone under a new head,
  then `base_model.layers[100:]` unfrozen at a 100x lower learning rate.

  The unfrozen BatchNorm layers train as Keras makes them (batch statistics,
  moving averages updated), as the blog leaves them.
  """
  import keras
  keras.utils.set_random_seed(seed)
  train = load_split(task_dir, "train", 32, shuffle=True, seed=seed)
  val = load_split(task_dir, "val", 32, shuffle=False)
  test = load_split(task_dir, "test", 32, shuffle=False)
  classes = len(os.listdir(os.path.join(task_dir, "train")))
  start = time.perf_counter()
  base_model = load_backbone(weights)
  x = keras.layers.GlobalAveragePooling2D()(base_model.output)
  x = keras.layers.Dense(128, activation="relu")(x)
  outputs = keras.layers.Dense(classes, activation="softmax")(x)
  model = keras.Model(base_model.input, outputs)

  def compile_at(learning_rate):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])

  def accuracy(dataset):
    return model.evaluate(dataset, verbose=0, return_dict=True)["accuracy"]

  for layer in base_model.layers:
    layer.trainable = False
  compile_at(1e-3)
  model.fit(train, validation_data=val, epochs=epochs, verbose=2)
  head_seconds = time.perf_counter() - start
  head = {"head_val_accuracy": accuracy(val),
          "head_test_accuracy": accuracy(test)}
  unfrozen = time.perf_counter()
  for layer in base_model.layers[100:]:
    layer.trainable = True
  compile_at(1e-5)
  model.fit(train, validation_data=val, epochs=2 * epochs,
            initial_epoch=epochs, verbose=2)
  train_seconds = head_seconds + time.perf_counter() - unfrozen
  return {"test_accuracy": accuracy(test), "val_accuracy": accuracy(val),
          **head, "unfrozen_layers": len(base_model.layers[100:]),
          "train_seconds": train_seconds,
          "recipe_seconds": time.perf_counter() - start}


def run_source_pretraining(source_dir: str, out_path: str, epochs: int,
                           seed: int) -> Dict:
  """The recipe that made fm59_resnet50.weights.h5 (pretrain_source.py).

  ResNet50 from scratch on the class folders, 90/10 train/val, caffe
  preprocessing, GAP -> Dense(5) softmax, Adam with cosine decay from 1e-3,
  batch 64, random flip + translation, XLA; saves the backbone's weights.
  """
  import keras
  import tensorflow as tf
  keras.utils.set_random_seed(seed)
  train, val = keras.utils.image_dataset_from_directory(
      source_dir, image_size=(IMAGE_SIZE, IMAGE_SIZE), batch_size=64,
      validation_split=0.1, subset="both", seed=seed)
  augment = keras.Sequential([keras.layers.RandomFlip("horizontal"),
                              keras.layers.RandomTranslation(0.1, 0.1)])
  train = train.map(lambda x, y: (augment(x, training=True), y),
                    num_parallel_calls=tf.data.AUTOTUNE).prefetch(4)
  val = val.cache().prefetch(4)
  base = keras.applications.ResNet50(include_top=False, weights=None,
                                     input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
  inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
  x = base(keras.applications.resnet50.preprocess_input(inputs))
  x = keras.layers.GlobalAveragePooling2D()(x)
  outputs = keras.layers.Dense(len(SOURCE_CLASSES), activation="softmax")(x)
  model = keras.Model(inputs, outputs)
  schedule = keras.optimizers.schedules.CosineDecay(
      1e-3, decay_steps=epochs * len(train))
  model.compile(keras.optimizers.Adam(schedule),
                "sparse_categorical_crossentropy", metrics=["accuracy"],
                jit_compile=True)
  start = time.perf_counter()
  history = model.fit(train, validation_data=val, epochs=epochs, verbose=2)
  # Saved beside, then renamed: an interrupted run leaves no partial file
  # under the name a later run would load.
  partial = out_path[:-len(".weights.h5")] + ".partial.weights.h5"
  base.save_weights(partial)
  os.replace(partial, out_path)
  return {"val_accuracy": history.history["val_accuracy"][-1],
          "seconds": time.perf_counter() - start, "weights": out_path}


def run_internal_recipe(recipe: str, task_dir: str, result_json: str,
                        weights: str, settings: Settings) -> None:
  """The child side of `run_recipe_process`: one recipe, result as JSON."""
  if recipe == "source":
    result = run_source_pretraining(task_dir, settings.make_source,
                                    settings.make_source_epochs, settings.seed)
  elif recipe == "probe":
    result = run_probe(task_dir, weights)
  else:
    result = run_seed_recipe(task_dir, weights, settings.seed,
                             settings.seed_epochs)
  with open(result_json, "w") as f:
    json.dump(result, f, indent=1)


# ------------------------------------------------- driver: subprocesses


def run_logged(command: List[str], log_path: str) -> Tuple[Optional[str],
                                                           float]:
  """Runs `command` with its stdout and stderr streamed into `log_path`.

  Returns:
    (None, seconds) on success; on failure ("exit N: last log line",
    seconds), after printing the log's path and its last lines.
  """
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
  start = time.perf_counter()
  with open(log_path, "w") as log:
    returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env).returncode
  seconds = time.perf_counter() - start
  if returncode == 0:
    return None, seconds
  with open(log_path, errors="replace") as f:
    lines = [line.rstrip() for line in f if line.strip()]
  print(f"  FAILED (exit {returncode}); log: {log_path}; last lines:",
        flush=True)
  for line in lines[-LOG_TAIL_LINES:]:
    print(f"    {line}")
  return f"exit {returncode}: {lines[-1] if lines else '(empty log)'}", seconds


def run_recipe_process(recipe: str, task_dir: str, run_dir: str,
                       weights: str, settings: Settings) -> Dict:
  """Runs probe, seed or source pretraining in a fresh Python process."""
  result_path = os.path.join(run_dir, f"{recipe}.json")
  log_path = os.path.join(run_dir, f"{recipe}.log")
  if os.path.exists(result_path):
    os.remove(result_path)
  command = [sys.executable, os.path.abspath(__file__),
             f"--run_recipe={recipe}", f"--task_dir={task_dir}",
             f"--result_json={result_path}", f"--seed={settings.seed}",
             f"--backbone_weights={weights}",
             f"--seed_epochs={settings.seed_epochs}",
             f"--make_source={settings.make_source}",
             f"--make_source_epochs={settings.make_source_epochs}"]
  error, seconds = run_logged(command, log_path)
  row = {"seconds": seconds, "log": log_path, "error": error}
  if error is None:
    with open(result_path) as f:
      row.update(json.load(f))
  return row


def package_command(*flags_: str) -> List[str]:
  return [sys.executable, "-m", "tf_finetune.main", *flags_]


def read_report(workdir: str) -> Dict:
  """Test and val accuracy and seconds of a package run's report.json."""
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  row = {"val_accuracy": report.get("val_accuracy"),
         "test_accuracy": report.get("test_accuracy"),
         "package_seconds": report.get("seconds"),
         "stage1_mode": report.get("stage1_mode"),
         "num_examples": report.get("num_examples")}
  if row["test_accuracy"] is None:
    row["error"] = "report.json has no test_accuracy"
  return row


def fresh_dir(path: str) -> str:
  """An empty folder: a package run must not resume an earlier run's
  checkpoints or search."""
  shutil.rmtree(path, ignore_errors=True)
  return path


def required_package_flags(task_dir: str, weights: str,
                           package_flags: str) -> List[str]:
  """The package flags of every package recipe (+ --package_flags)."""
  return [f"--dataset=folder:{task_dir}", f"--weights={weights}",
          f"--image_size={IMAGE_SIZE}", *shlex.split(package_flags)]


def run_package(name: str, task_dir: str, run_dir: str, weights: str,
                package_flags: str, *recipe_flags: str) -> Dict:
  """The package as a user runs it: only the flags a user must give, then
  the recipe's own (last: absl keeps the last value of a flag, so they win
  over --package_flags)."""
  workdir = fresh_dir(os.path.join(run_dir, name))
  log_path = os.path.join(run_dir, f"{name}.log")
  error, seconds = run_logged(
      package_command(*required_package_flags(task_dir, weights,
                                              package_flags),
                      f"--workdir={workdir}", *recipe_flags), log_path)
  row = {"seconds": seconds, "log": log_path, "error": error}
  if error is None:
    row.update(read_report(workdir))
  return row


def run_tune(task_dir: str, run_dir: str, weights: str,
             package_flags: str) -> Dict:
  """`--mode=tune` with the package's own search space and tuner; the
  search keeps its best trial's model in WORKDIR/best/ (a training workdir),
  whose report gives the accuracies: no retraining."""
  search_dir = fresh_dir(os.path.join(run_dir, "tune_search"))
  search_log = os.path.join(run_dir, "tune_search.log")
  error, search_seconds = run_logged(
      package_command(*required_package_flags(task_dir, weights,
                                              package_flags),
                      "--mode=tune", f"--workdir={search_dir}"), search_log)
  row = {"seconds": search_seconds, "search_seconds": search_seconds,
         "log": search_log, "error": error and f"search: {error}"}
  if error is not None:
    return row
  with open(os.path.join(search_dir, "tuning_report.json")) as f:
    tuning = json.load(f)
  best = next((t for t in tuning["trials"]
               if t["trial_id"] == tuning["best_trial"]), {})
  row.update(search_space=tuning["search_space"],
             trials=len(tuning["trials"]),
             best_hyperparameters=best.get("hyperparameters"),
             peak_rss_mb=[t["peak_rss_mb"] for t in tuning["trials"]])
  row.update(read_report(os.path.join(search_dir, "best")))
  # The search's wall time, not the kept trial's own.
  row["package_seconds"] = search_seconds
  return row


def run_recipe(recipe: str, task_dir: str, run_dir: str, weights: str,
               settings: Settings) -> Dict:
  if recipe in ("probe", "seed"):
    return run_recipe_process(recipe, task_dir, run_dir, weights, settings)
  if recipe == "head":
    return run_package("head", task_dir, run_dir, weights,
                       settings.package_flags, "--finetune_epochs=0")
  if recipe == "defaults":
    return run_package("defaults", task_dir, run_dir, weights,
                       settings.package_flags)
  return run_tune(task_dir, run_dir, weights, settings.package_flags)


def make_source_backbone(data_root: str, runs_root: str, mnist_dir: str,
                         settings: Settings) -> str:
  """--make_source: pretrains the backbone in a fresh process; its path."""
  source_dir = prepare_source(data_root, mnist_dir,
                              settings.make_source_images, settings.seed)
  run_dir = os.path.join(runs_root, "source")
  os.makedirs(run_dir, exist_ok=True)
  print(f"source: pretraining on {source_dir} for "
        f"{settings.make_source_epochs} epochs (log: "
        f"{os.path.join(run_dir, 'source.log')})", flush=True)
  row = run_recipe_process("source", source_dir, run_dir, "", settings)
  if row["error"]:
    sys.exit(f"bench_transfer: --make_source failed ({row['error']}); log: "
             f"{row['log']}")
  print(f"source: saved {row['weights']}, val_accuracy "
        f"{row['val_accuracy']:.4f}, {row['seconds']:.0f} s of training",
        flush=True)
  return settings.make_source


# ---------------------------------------------------------------- output
#
# results: {task: {recipe: [row of each draw, in draw order]}}; a row holds
# "draw_seed", "seconds", "error" (None when it succeeded) and, when it
# succeeded, "val_accuracy" and "test_accuracy".


def percent(value: Optional[float]) -> str:
  return "" if value is None else f"{100 * value:.1f}"


def format_points(points: Optional[float]) -> str:
  """Signed, one decimal ("+3.2", "-0.4", "+0.0"); "n/a" when missing."""
  if points is None:
    return "n/a"
  rounded = round(points, 1)
  return f"{rounded + 0.0:+.1f}"  # + 0.0: no "-0.0".


def mean_sd(values: Sequence[float]) -> Tuple[Optional[float],
                                              Optional[float]]:
  """(mean, sample standard deviation); sd None for fewer than two values,
  both None for none."""
  if not values:
    return None, None
  return (float(np.mean(values)),
          float(np.std(values, ddof=1)) if len(values) > 1 else None)


def format_mean_sd(values: Sequence[float]) -> str:
  """Percent "mean ± sd" ("72.0 ± 2.0"; "72.0" of one value; "" of none)."""
  mean, sd = mean_sd(values)
  if mean is None:
    return ""
  return percent(mean) + ("" if sd is None else f" ± {100 * sd:.1f}")


def succeeded(rows: Sequence[Dict]) -> List[Dict]:
  return [row for row in rows if not row.get("error")]


def accuracies(rows: Sequence[Dict], split: str) -> List[float]:
  """The split's accuracy of each draw that succeeded and has one."""
  return [row[f"{split}_accuracy"] for row in succeeded(rows)
          if row.get(f"{split}_accuracy") is not None]


def every_draw(results: Dict, task: str, recipe: str,
               key: str) -> Optional[Dict[int, float]]:
  """{draw seed: row[key]} when the recipe ran and succeeded on every draw
  of the task with a value for `key`; otherwise None."""
  rows = results.get(task, {}).get(recipe)
  if not rows or any(row.get("error") or row.get(key) is None
                     for row in rows):
    return None
  return {row["draw_seed"]: row[key] for row in rows}


def points_over(results: Dict, task: str, recipe: str, baseline: str,
                split: str) -> Optional[float]:
  """Accuracy points of `recipe` above `baseline` on `task`'s `split`: the
  mean over draws of the per-draw difference; None unless both succeeded
  on the same draws, all of them (a mean over fewer draws would silently
  compare other images)."""
  key = f"{split}_accuracy"
  a, b = (every_draw(results, task, r, key) for r in (recipe, baseline))
  if a is None or b is None or set(a) != set(b):
    return None
  return 100 * float(np.mean([a[seed] - b[seed] for seed in a]))


def seconds_ratio(results: Dict, task: str, recipe: str,
                  baseline: str) -> Optional[float]:
  """Mean seconds of `recipe` / mean seconds of `baseline` on `task`; None
  unless both succeeded on every draw."""
  a, b = (every_draw(results, task, r, "seconds") for r in (recipe, baseline))
  if a is None or b is None:
    return None
  return float(np.mean(list(a.values())) / np.mean(list(b.values())))


def mean_accuracy(results: Dict, task: str, recipe: str,
                  split: str) -> Optional[float]:
  """The recipe's mean accuracy over draws; None unless every draw
  succeeded."""
  values = every_draw(results, task, recipe, f"{split}_accuracy")
  return None if values is None else float(np.mean(list(values.values())))


def tasks_in_order(results: Dict) -> List[str]:
  return [task for task in TASKS if task in results]


def summary_lines(results: Dict, split: str, suffix: str = "") -> List[str]:
  """The accuracy lines on `split`, `suffix` after each name; those the
  brief fixes (`TASK_defaults_vs_probe`, `far_tuned`) come last."""
  tasks = tasks_in_order(results)
  lines = []
  for name, recipe, baseline in (("defaults_vs_seed", "defaults", "seed"),
                                 ("head_vs_probe", "head", "probe"),
                                 ("tune_vs_defaults", "tune", "defaults"),
                                 ("defaults_vs_probe", "defaults", "probe")):
    lines += [f"{task}_{name}{suffix}: " + format_points(
        points_over(results, task, recipe, baseline, split))
              for task in tasks]
  if "far" in results:
    tuned = mean_accuracy(results, "far", "tune", split)
    lines.append(f"far_tuned{suffix}: "
                 + ("n/a" if tuned is None else percent(tuned)))
  return lines


def seconds_lines(results: Dict) -> List[str]:
  """`TASK_defaults_seconds_vs_seed: R` and `TASK_tune_seconds_vs_defaults:
  R` per task."""
  lines = []
  for recipe, baseline in (("defaults", "seed"), ("tune", "defaults")):
    for task in tasks_in_order(results):
      ratio = seconds_ratio(results, task, recipe, baseline)
      lines.append(f"{task}_{recipe}_seconds_vs_{baseline}: "
                   + ("n/a" if ratio is None else f"{ratio:.2f}"))
  return lines


def row_note(recipe: str, row: Dict) -> str:
  """What one draw's recipe chose, or its error."""
  if row.get("error"):
    return (f"FAILED draw {row.get('draw_seed')}: "
            + row["error"].replace("|", "/")[:200])
  if recipe == "probe":
    return f"C={row['C']:g}"
  if recipe == "tune":
    return (f"{row['trials']} trials over {row['search_space']}, best "
            f"{row['best_hyperparameters']}; search {row['search_seconds']:.0f}"
            f" s, trial peak RSS up to "
            f"{max(filter(None, row['peak_rss_mb']), default=0):.0f} MB")
  if recipe in ("head", "defaults"):
    return f"stage 1 on {row.get('stage1_mode')}"
  return ""


def notes(recipe: str, rows: Sequence[Dict]) -> str:
  """The draws' notes: once when all say the same, else each, by " / "."""
  each = [row_note(recipe, row) for row in rows]
  return each[0] if len(set(each)) == 1 else " / ".join(each)


def draws_column(rows: Sequence[Dict]) -> str:
  return f"{len(succeeded(rows))}/{len(rows)}"


def decision_table(results: Dict, split: str) -> str:
  """Markdown: a row per task and recipe, `split` accuracy mean ± sd over
  the draws that succeeded, mean seconds, what each draw chose."""
  lines = [f"| task | recipe | {split} % (mean ± sd) | seconds (mean) | "
           "draws ok | note |", "|---|---|---:|---:|---:|---|"]
  for task in tasks_in_order(results):
    for recipe, rows in results[task].items():
      seconds, _ = mean_sd([row["seconds"] for row in rows])
      lines.append(f"| {task} | {recipe} | "
                   f"{format_mean_sd(accuracies(rows, split))} | "
                   f"{seconds:.0f} | {draws_column(rows)} | "
                   f"{notes(recipe, rows)} |")
  return "\n".join(lines)


def test_table(results: Dict) -> str:
  """Markdown: val and test accuracy mean ± sd and the seed recipe's
  head-only test accuracy, per task and recipe."""
  lines = ["| task | recipe | val % | test % | head-only test % | "
           "seconds | draws ok |", "|---|---|---:|---:|---:|---:|---:|"]
  for task in tasks_in_order(results):
    for recipe, rows in results[task].items():
      seconds, _ = mean_sd([row["seconds"] for row in rows])
      lines.append(f"| {task} | {recipe} | "
                   f"{format_mean_sd(accuracies(rows, 'val'))} | "
                   f"{format_mean_sd(accuracies(rows, 'test'))} | "
                   f"{format_mean_sd(accuracies(rows, 'head_test'))} | "
                   f"{seconds:.0f} | {draws_column(rows)} |")
  return "\n".join(lines)


def aggregates(results: Dict) -> Dict:
  """{task: {recipe: means and sds over the draws}} for the JSON."""
  out = {}
  for task in tasks_in_order(results):
    out[task] = {}
    for recipe, rows in results[task].items():
      entry = {"draws": len(rows), "draws_ok": len(succeeded(rows)),
               "seconds_mean": mean_sd([r["seconds"] for r in rows])[0]}
      for split in SPLITS:
        entry[f"{split}_mean"], entry[f"{split}_sd"] = mean_sd(
            accuracies(rows, split))
      out[task][recipe] = entry
  return out


def report(results: Dict, decide_on: str) -> Tuple[str, Dict]:
  """The printed report and the JSON's summary.

  First the decision table and lines on `decide_on`, then the test table
  and the accuracy lines on test (`_test`).
  """
  draws = max((len(rows) for recipes in results.values()
               for rows in recipes.values()), default=0)
  decisions = summary_lines(results, decide_on)
  seconds = seconds_lines(results)
  tests = summary_lines(results, "test", suffix="_test")
  text = "\n".join([
      f"Decisions: {decide_on} accuracy, mean over {draws} draws.",
      decision_table(results, decide_on), *seconds, *decisions, "",
      "Test accuracy (to report, not to decide by):", test_table(results),
      *tests])
  summary = {"decide_on": decide_on,
             "decisions": dict(line.split(": ", 1)
                               for line in seconds + decisions),
             "test": dict(line.split(": ", 1) for line in tests)}
  return text, summary


# ---------------------------------------------------------------- main


def check_flags(make_source: str, backbone_weights: str,
                fashion_mnist_dir: str, tasks: Sequence[str]) -> str:
  """Fails on bad flags before any work; returns the backbone weights path
  (empty with --make_source, which makes it)."""
  if make_source and backbone_weights:
    sys.exit("bench_transfer: give --backbone_weights or --make_source, not "
             "both.")
  if make_source and not make_source.endswith(".weights.h5"):
    sys.exit(f"bench_transfer: --make_source={make_source!r}: must end in "
             ".weights.h5.")
  if not make_source:
    if not backbone_weights:
      sys.exit("bench_transfer: --backbone_weights=PATH is required: a "
               "ResNet50(include_top=False, input_shape=(32, 32, 3)) "
               ".weights.h5 pretrained on Fashion-MNIST classes 5-9; "
               "--make_source=PATH makes one (~45 min on 2 cores).")
    if not os.path.isfile(backbone_weights):
      sys.exit(f"bench_transfer: --backbone_weights={backbone_weights!r}"
               ": no such file.")
  if make_source or set(tasks) - {"digits"}:
    require_fashion_mnist(fashion_mnist_dir)
  return "" if make_source else os.path.abspath(backbone_weights)


def prepare_draws(tasks: Dict[str, Task], draw_seeds: Sequence[int],
                  data_root: str, load: Loader) -> Dict[str, List[str]]:
  """{task: [its folder of each draw]}, written where not found.

  Raises:
    ValueError: a class has too few images for a task's sizes.
  """
  return {name: [prepare_task(task, seed, data_root, load)
                 for seed in draw_seeds] for name, task in tasks.items()}


def run_all(task_dirs: Dict[str, List[str]], recipes: Sequence[str],
            runs_root: str, weights: str, settings: Settings) -> Dict:
  """Every selected recipe on every task and draw; {task: {recipe: [row
  per draw]}}."""
  results = {}
  for name, folders in task_dirs.items():
    results[name] = {recipe: [] for recipe in RECIPES if recipe in recipes}
    for seed, task_dir in zip(settings.draw_seeds, folders):
      run_dir = os.path.join(runs_root, name, f"draw{seed}")
      os.makedirs(run_dir, exist_ok=True)
      for recipe in results[name]:
        print(f"{name} draw {seed} {recipe}: running; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        row = {"draw_seed": seed, "task_dir": task_dir,
               **run_recipe(recipe, task_dir, run_dir, weights, settings)}
        results[name][recipe].append(row)
        print(f"{name} draw {seed} {recipe}: val "
              f"{percent(row.get('val_accuracy')) or '-'} %, "
              f"{row['seconds']:.0f} s", flush=True)
  return results


def main(argv):
  del argv
  settings = Settings(
      seed=FLAGS.seed, draws=FLAGS.draws, decide_on=FLAGS.decide_on,
      seed_epochs=FLAGS.seed_epochs, package_flags=FLAGS.package_flags,
      make_source=FLAGS.make_source,
      make_source_images=FLAGS.make_source_images,
      make_source_epochs=FLAGS.make_source_epochs)
  if FLAGS.run_recipe:
    run_internal_recipe(FLAGS.run_recipe, FLAGS.task_dir, FLAGS.result_json,
                        FLAGS.backbone_weights, settings)
    return
  weights = check_flags(FLAGS.make_source, FLAGS.backbone_weights,
                        FLAGS.fashion_mnist_dir, FLAGS.tasks)
  mnist_dir = FLAGS.fashion_mnist_dir
  all_tasks = make_tasks(FLAGS.train_per_class, FLAGS.val_per_class,
                         FLAGS.far_test_per_class, FLAGS.near_test_per_class)
  tasks = {name: all_tasks[name] for name in TASKS if name in FLAGS.tasks}
  workdir = os.path.abspath(FLAGS.workdir or tempfile.mkdtemp(
      prefix="bench_transfer-"))
  data_root = os.path.join(workdir, "data")
  runs_root = os.path.join(workdir, "runs")
  os.makedirs(data_root, exist_ok=True)
  print(f"bench_transfer: workdir {workdir}; tasks {list(tasks)}, recipes "
        f"{FLAGS.recipes}; draw seeds {settings.draw_seeds}; sizes "
        + "; ".join(task.folder_name(settings.seed) for task in tasks.values())
        + f"; package flags {settings.package_flags!r}; {os.cpu_count()} "
        "CPUs", flush=True)
  # Each source split is read once, however many draws and tasks use it.
  load = functools.lru_cache(maxsize=None)(
      lambda domain, split: load_source(domain, split, mnist_dir))
  try:
    task_dirs = prepare_draws(tasks, settings.draw_seeds, data_root, load)
    if settings.make_source:
      weights = os.path.abspath(make_source_backbone(data_root, runs_root,
                                                     mnist_dir, settings))
  except ValueError as e:  # Too many images asked of a class.
    sys.exit(f"bench_transfer: {e}")
  results = run_all(task_dirs, FLAGS.recipes, runs_root, weights, settings)
  print(f"load average after: {os.getloadavg()[0]:.2f}")
  text, summary = report(results, settings.decide_on)
  output_json = FLAGS.output_json or os.path.join(workdir, "results.json")
  with open(output_json, "w") as f:
    json.dump({"settings": {name: FLAGS[name].value for name in (
        "tasks", "recipes", "seed", "draws", "decide_on", "train_per_class",
        "val_per_class", "far_test_per_class", "near_test_per_class",
        "seed_epochs", "package_flags", "make_source_images",
        "make_source_epochs")},
               "tasks": {name: dataclasses.asdict(task)
                         for name, task in tasks.items()},
               "backbone_weights": weights, "task_dirs": task_dirs,
               "results": results, "aggregates": aggregates(results),
               "summary": summary}, f, indent=1)
  print(f"results: {output_json}")
  print(text)


if __name__ == "__main__":
  define_flags()
  app.run(main)

"""Benchmark: transfer to real images, the package's recipe judged.

A ResNet50 pretrained here on Fashion-MNIST classes 5-9 (sandal, shirt,
sneaker, bag, ankle boot) is transferred to two 5-class tasks of real
images, 32 px RGB PNGs made from Fashion-MNIST as the backbone saw them:

  far   classes 0-4 (t-shirt, trouser, pullover, dress, coat), new to the
        backbone: 50 train + 100 val per class from the training split, the
        test split's 1,000 per class as test.
  near  classes 5-9 from the test split, images the backbone never saw of
        classes it knows: 50 train + 100 val + 850 test per class.

Each task is learned by up to four recipes, each in its own Python process:

  probe     linear probe: logistic regression on the frozen backbone's pooled
            features, C picked on val. What the backbone alone is worth.
  seed      the seed blog's recipe in plain Keras: frozen backbone, GAP ->
            Dense(128, relu) -> Dense(5), Adam 1e-3 for 10 epochs; unfreeze
            `base_model.layers[100:]`, Adam 1e-5 for 10 more. No augmentation.
  defaults  `python -m tf_finetune.main` with every flag at its default but
            --dataset, --weights, --image_size and --workdir.
  tune      `--mode=tune` with the same flags (the package's own search
            space), then training with the best.cfg it writes.

Seconds are wall clock of the recipe's processes, start to exit: Python and
TensorFlow start-up, data loading, model build, training, evaluation (and
the package's export and report) all count, alike for every recipe.

  python tools/bench_transfer.py --workdir=/tmp/transfer \\
      --backbone_weights=PATH/fm59_resnet50.weights.h5

`--make_source=PATH` pretrains such a backbone first (the recipe of
`pretrain_source`, ~45 min on 2 cores) and uses it. Data: Debian's
dataset-fashion-mnist package (`--fashion_mnist_dir`). The table is markdown;
the last lines are `far_defaults_vs_probe: +P`, `near_defaults_vs_probe: +P`
(test accuracy points of the package's defaults over the probe) and
`far_tuned: A` (test accuracy %, tuned); before them the same against the
seed recipe and `defaults_seconds_vs_seed` (seconds of defaults / seed,
summed over the tasks). Everything is also written as JSON (`--output_json`).
"""

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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
# Fashion-MNIST's labels 0-9; class folders are named "LABEL_NAME" so that
# sorting them (as every loader does) keeps the label order.
CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle_boot")
SOURCE_CLASSES = (5, 6, 7, 8, 9)
TASK_CLASSES = {"far": (0, 1, 2, 3, 4), "near": SOURCE_CLASSES}
TASKS = tuple(TASK_CLASSES)
RECIPES = ("probe", "seed", "defaults", "tune")
IMAGE_SIZE = 32  # The backbone's pretraining size.
# Half decades from 1e-3 to 1e3: the probe's regularisation candidates.
PROBE_C_GRID = tuple(float(10.0 ** (e / 2)) for e in range(-6, 7))
LOG_TAIL_LINES = 15


def define_flags() -> None:
  """Defines the tool's flags.

  Called only when the file runs as a script: tests import it next to
  `tf_finetune.main`, whose --workdir, --seed and --dataset would clash.
  """
  flags.DEFINE_string("workdir", "", "Output folder; empty: a new temporary "
                      "folder. Task folders found there with the same sizes "
                      "and seed are reused.")
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
  flags.DEFINE_integer("seed", 0, "Seed of the image draws and of the probe "
                       "and seed recipes (the package keeps its own).")
  flags.DEFINE_integer("train_per_class", 50, "Train images per class.")
  flags.DEFINE_integer("val_per_class", 100, "Val images per class.")
  flags.DEFINE_integer("far_test_per_class", 1000, "Test images per class of "
                       "task far, from the test split (1,000: all).")
  flags.DEFINE_integer("near_test_per_class", 850, "Test images per class of "
                       "task near, after its train and val images (the test "
                       "split has 1,000 per class).")
  flags.DEFINE_integer("seed_epochs", 10, "Epochs of each stage of the seed "
                       "recipe.")
  flags.DEFINE_string("package_flags", "", "Extra flags for the package's "
                      "runs (defaults and tune), split like a shell does.")
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


# ------------------------------------------------------------------- data


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


def stratified_draw(labels: np.ndarray, classes: Sequence[int],
                    counts: Sequence[Tuple[str, int]],
                    seed) -> Dict[str, np.ndarray]:
  """Draws disjoint, per-class sets of indices of `labels`.

  Args:
    labels: the label of every image of one source split.
    classes: the labels to draw from.
    counts: (name, images per class) of each set, e.g. [("train", 50),
      ("val", 100)].
    seed: anything `np.random.default_rng` takes; the same seed gives the
      same draw.

  Returns:
    {name: sorted indices}, `count` of each class per set.

  Raises:
    ValueError: a class has fewer images than the sets need together.
  """
  rng = np.random.default_rng(seed)
  needed = sum(count for _, count in counts)
  drawn = {name: [] for name, _ in counts}
  for label in classes:
    pool = np.flatnonzero(labels == label)
    if len(pool) < needed:
      raise ValueError(f"class {label} ({CLASS_NAMES[label]}) has "
                       f"{len(pool)} images; {needed} requested "
                       f"({', '.join(f'{n} {c}' for n, c in counts)}).")
    order = rng.permutation(pool)
    start = 0
    for name, count in counts:
      drawn[name].append(order[start:start + count])
      start += count
  return {name: np.sort(np.concatenate(parts)) for name, parts in drawn.items()}


def task_plan(task: str, train: int, val: int, far_test: int,
              near_test: int) -> List[Tuple[str, List[Tuple[str, int]]]]:
  """[(Fashion-MNIST split, [(task split, images per class), ...]), ...].

  Sets drawn from the same Fashion-MNIST split are drawn together, so they
  never share an image.
  """
  if task == "far":
    return [("train", [("train", train), ("val", val)]),
            ("t10k", [("test", far_test)])]
  return [("t10k", [("train", train), ("val", val), ("test", near_test)])]


def class_folder_name(label: int) -> str:
  return f"{label}_{CLASS_NAMES[label]}"


def resize_to_rgb(images: np.ndarray) -> np.ndarray:
  """[N, 28, 28] gray -> [N, 32, 32, 3] uint8, as the backbone was pretrained:
  bilinear `tf.image.resize`, rounded and clipped, gray copied to RGB."""
  import tensorflow as tf
  resized = tf.image.resize(images[..., None].astype(np.float32),
                            (IMAGE_SIZE, IMAGE_SIZE), method="bilinear")
  gray = np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)
  return np.repeat(gray, 3, axis=-1)


def write_pngs(folder: str, images: np.ndarray, labels: np.ndarray,
               indices: np.ndarray, prefix: str) -> None:
  """Writes images[indices] as FOLDER/LABEL_NAME/PREFIX-INDEX.png.

  The file name keeps the image's index in its idx file, so every PNG can
  be traced back to its source.
  """
  import tensorflow as tf
  pixels = resize_to_rgb(images[indices])
  for index, rgb in zip(indices, pixels):
    class_dir = os.path.join(folder, class_folder_name(int(labels[index])))
    os.makedirs(class_dir, exist_ok=True)
    with open(os.path.join(class_dir, f"{prefix}-{index:05d}.png"), "wb") as f:
      f.write(tf.io.encode_png(rgb).numpy())


def prepare_task(task: str, data_root: str, mnist_dir: str) -> str:
  """Writes the task's train/val/test class folders (once) and returns them.

  The folder's name holds the seed and the sizes, so a folder found under
  that name was drawn with the same settings and is reused. It is written
  under another name and renamed when complete: an interrupted run leaves
  no half folder to reuse.
  """
  plan = task_plan(task, FLAGS.train_per_class, FLAGS.val_per_class,
                   FLAGS.far_test_per_class, FLAGS.near_test_per_class)
  sizes = "-".join(f"{split}{count}" for _, sets in plan
                   for split, count in sets)
  folder = os.path.join(data_root, f"{task}-seed{FLAGS.seed}-{sizes}")
  if os.path.isdir(folder):
    print(f"{task}: reusing {folder}", flush=True)
    return folder
  staging = folder + ".partial"
  shutil.rmtree(staging, ignore_errors=True)
  for source_index, (source, sets) in enumerate(plan):
    images, labels = load_fashion_mnist(mnist_dir, source)
    # One seed per (task, source split): the tasks' draws are independent.
    draw = stratified_draw(labels, TASK_CLASSES[task], sets,
                           [FLAGS.seed, TASKS.index(task), source_index])
    for split, indices in draw.items():
      write_pngs(os.path.join(staging, split), images, labels, indices, source)
  os.rename(staging, folder)
  print(f"{task}: wrote {folder}", flush=True)
  return folder


def prepare_source(data_root: str, mnist_dir: str, images: int) -> str:
  """Class folders of `images` training-split images of classes 5-9, the
  pretraining data (all 30,000 by default; fewer are a stratified draw)."""
  folder = os.path.join(data_root, f"source-seed{FLAGS.seed}-images{images}")
  if os.path.isdir(folder):
    return folder
  all_images, labels = load_fashion_mnist(mnist_dir, "train")
  per_class = images // len(SOURCE_CLASSES)
  draw = stratified_draw(labels, SOURCE_CLASSES, [("source", per_class)],
                         [FLAGS.seed, len(TASKS)])
  staging = folder + ".partial"
  shutil.rmtree(staging, ignore_errors=True)
  write_pngs(staging, all_images, labels, draw["source"], "train")
  os.rename(staging, folder)
  return folder


# ------------------------------------------- recipes run in this process


def load_split(task_dir: str, split: str, batch_size: int, shuffle: bool):
  """(preprocessed images, int labels) batches of one split's class folders.

  Caffe preprocessing (`resnet50.preprocess_input`) as the package's model
  applies it and as the backbone was pretrained.
  """
  import keras
  import tensorflow as tf
  dataset = keras.utils.image_dataset_from_directory(
      os.path.join(task_dir, split), image_size=(IMAGE_SIZE, IMAGE_SIZE),
      batch_size=batch_size, label_mode="int", shuffle=shuffle,
      seed=FLAGS.seed)
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


def run_probe(task_dir: str) -> Dict:
  """Logistic regression on the frozen backbone's pooled features.

  C is the grid value with the best val accuracy (the smallest on a tie:
  the most regularised of the equals); the model is then refit on train.
  """
  import keras
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  start = time.perf_counter()
  backbone = load_backbone(FLAGS.backbone_weights)
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


def run_seed_recipe(task_dir: str) -> Dict:
  """The seed blog's two stages, plainly: frozen backbone under a new head,
  then `base_model.layers[100:]` unfrozen at a 100x lower learning rate.

  The unfrozen BatchNorm layers train as Keras makes them (batch statistics,
  moving averages updated), as the blog leaves them.
  """
  import keras
  keras.utils.set_random_seed(FLAGS.seed)
  train = load_split(task_dir, "train", 32, shuffle=True)
  val = load_split(task_dir, "val", 32, shuffle=False)
  test = load_split(task_dir, "test", 32, shuffle=False)
  classes = len(os.listdir(os.path.join(task_dir, "train")))
  start = time.perf_counter()
  base_model = load_backbone(FLAGS.backbone_weights)
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
  model.fit(train, validation_data=val, epochs=FLAGS.seed_epochs, verbose=2)
  head_seconds = time.perf_counter() - start
  head = {"head_val_accuracy": accuracy(val),
          "head_test_accuracy": accuracy(test)}
  unfrozen = time.perf_counter()
  for layer in base_model.layers[100:]:
    layer.trainable = True
  compile_at(1e-5)
  model.fit(train, validation_data=val, epochs=2 * FLAGS.seed_epochs,
            initial_epoch=FLAGS.seed_epochs, verbose=2)
  train_seconds = head_seconds + time.perf_counter() - unfrozen
  return {"test_accuracy": accuracy(test), "val_accuracy": accuracy(val),
          **head, "unfrozen_layers": len(base_model.layers[100:]),
          "train_seconds": train_seconds,
          "recipe_seconds": time.perf_counter() - start}


def run_source_pretraining(source_dir: str, out_path: str, epochs: int) -> Dict:
  """The recipe that made fm59_resnet50.weights.h5 (pretrain_source.py).

  ResNet50 from scratch on the class folders, 90/10 train/val, caffe
  preprocessing, GAP -> Dense(5) softmax, Adam with cosine decay from 1e-3,
  batch 64, random flip + translation, XLA; saves the backbone's weights.
  """
  import keras
  import tensorflow as tf
  keras.utils.set_random_seed(FLAGS.seed)
  train, val = keras.utils.image_dataset_from_directory(
      source_dir, image_size=(IMAGE_SIZE, IMAGE_SIZE), batch_size=64,
      validation_split=0.1, subset="both", seed=FLAGS.seed)
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


def run_internal_recipe() -> None:
  """The child side of `run_recipe_process`: one recipe, result as JSON."""
  if FLAGS.run_recipe == "source":
    result = run_source_pretraining(FLAGS.task_dir, FLAGS.make_source,
                                    FLAGS.make_source_epochs)
  elif FLAGS.run_recipe == "probe":
    result = run_probe(FLAGS.task_dir)
  else:
    result = run_seed_recipe(FLAGS.task_dir)
  with open(FLAGS.result_json, "w") as f:
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
                       weights: str) -> Dict:
  """Runs probe, seed or source pretraining in a fresh Python process."""
  result_path = os.path.join(run_dir, f"{recipe}.json")
  log_path = os.path.join(run_dir, f"{recipe}.log")
  if os.path.exists(result_path):
    os.remove(result_path)
  command = [sys.executable, os.path.abspath(__file__),
             f"--run_recipe={recipe}", f"--task_dir={task_dir}",
             f"--result_json={result_path}", f"--seed={FLAGS.seed}",
             f"--backbone_weights={weights}",
             f"--seed_epochs={FLAGS.seed_epochs}",
             f"--make_source={FLAGS.make_source}",
             f"--make_source_epochs={FLAGS.make_source_epochs}"]
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


def run_defaults(task_dir: str, run_dir: str, weights: str) -> Dict:
  """The package as a user runs it: only the flags a user must give."""
  workdir = fresh_dir(os.path.join(run_dir, "defaults"))
  error, seconds = run_logged(
      package_command(*required_package_flags(task_dir, weights),
                      f"--workdir={workdir}"),
      os.path.join(run_dir, "defaults.log"))
  row = {"seconds": seconds, "log": os.path.join(run_dir, "defaults.log"),
         "error": error}
  if error is None:
    row.update(read_report(workdir))
  return row


def required_package_flags(task_dir: str, weights: str) -> List[str]:
  """The package flags of both package recipes (+ --package_flags)."""
  return [f"--dataset=folder:{task_dir}", f"--weights={weights}",
          f"--image_size={IMAGE_SIZE}", *shlex.split(FLAGS.package_flags)]


def run_tune(task_dir: str, run_dir: str, weights: str) -> Dict:
  """`--mode=tune` with the package's own search space, then training with
  its best.cfg in a new workdir; seconds are both runs'."""
  search_dir = fresh_dir(os.path.join(run_dir, "tune_search"))
  train_dir = fresh_dir(os.path.join(run_dir, "tune_train"))
  search_log = os.path.join(run_dir, "tune_search.log")
  error, search_seconds = run_logged(
      package_command(*required_package_flags(task_dir, weights),
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
             best_hyperparameters=best.get("hyperparameters"))
  train_log = os.path.join(run_dir, "tune_train.log")
  # --workdir after --flagfile: absl reads flags in order, the last wins.
  error, train_seconds = run_logged(
      package_command(f"--flagfile={os.path.join(search_dir, 'best.cfg')}",
                      f"--workdir={train_dir}"), train_log)
  row.update(seconds=search_seconds + train_seconds,
             train_seconds=train_seconds, log=train_log,
             error=error and f"best.cfg training: {error}")
  if error is None:
    row.update(read_report(train_dir))
  return row


def run_recipe(recipe: str, task_dir: str, run_dir: str, weights: str) -> Dict:
  if recipe in ("probe", "seed"):
    return run_recipe_process(recipe, task_dir, run_dir, weights)
  if recipe == "defaults":
    return run_defaults(task_dir, run_dir, weights)
  return run_tune(task_dir, run_dir, weights)


def make_source_backbone(data_root: str, runs_root: str) -> str:
  """--make_source: pretrains the backbone in a fresh process; its path."""
  if not FLAGS.make_source.endswith(".weights.h5"):
    sys.exit(f"--make_source={FLAGS.make_source!r}: must end in .weights.h5.")
  source_dir = prepare_source(data_root, FLAGS.fashion_mnist_dir,
                              FLAGS.make_source_images)
  run_dir = os.path.join(runs_root, "source")
  os.makedirs(run_dir, exist_ok=True)
  print(f"source: pretraining on {source_dir} for {FLAGS.make_source_epochs} "
        f"epochs (log: {os.path.join(run_dir, 'source.log')})", flush=True)
  row = run_recipe_process("source", source_dir, run_dir, "")
  if row["error"]:
    sys.exit(f"bench_transfer: --make_source failed ({row['error']}); log: "
             f"{row['log']}")
  print(f"source: saved {row['weights']}, val_accuracy "
        f"{row['val_accuracy']:.4f}, {row['seconds']:.0f} s of training",
        flush=True)
  return FLAGS.make_source


# ---------------------------------------------------------------- output


def percent(value: Optional[float]) -> str:
  return "" if value is None else f"{100 * value:.1f}"


def format_points(points: Optional[float]) -> str:
  """Signed, one decimal ("+3.2", "-0.4", "+0.0"); "n/a" when missing."""
  if points is None:
    return "n/a"
  rounded = round(points, 1)
  return f"{rounded + 0.0:+.1f}"  # + 0.0: no "-0.0".


def test_accuracy(results: Dict, task: str, recipe: str) -> Optional[float]:
  """A recipe's test accuracy, None when it did not run or failed."""
  row = results.get(task, {}).get(recipe)
  if not row or row.get("error"):
    return None
  return row.get("test_accuracy")


def points_over(results: Dict, task: str, recipe: str,
                baseline: str) -> Optional[float]:
  """Test accuracy points of `recipe` above `baseline` on `task`."""
  a, b = (test_accuracy(results, task, r) for r in (recipe, baseline))
  return None if a is None or b is None else 100 * (a - b)


def seconds_ratio(results: Dict, recipe: str, baseline: str) -> Optional[float]:
  """Seconds of `recipe` / `baseline`, summed over the tasks both ran."""
  tasks = [t for t in results if test_accuracy(results, t, recipe) is not None
           and test_accuracy(results, t, baseline) is not None]
  if not tasks:
    return None
  return (sum(results[t][recipe]["seconds"] for t in tasks)
          / sum(results[t][baseline]["seconds"] for t in tasks))


def summary_lines(results: Dict) -> List[str]:
  """The closing lines; those the brief fixes come last."""
  ratio = seconds_ratio(results, "defaults", "seed")
  tuned = test_accuracy(results, "far", "tune")
  lines = [f"{task}_defaults_vs_seed: "
           + format_points(points_over(results, task, "defaults", "seed"))
           for task in TASKS]
  lines.append("defaults_seconds_vs_seed: "
               + ("n/a" if ratio is None else f"{ratio:.2f}"))
  lines += [f"{task}_defaults_vs_probe: "
            + format_points(points_over(results, task, "defaults", "probe"))
            for task in TASKS]
  lines.append("far_tuned: " + ("n/a" if tuned is None else percent(tuned)))
  return lines


def row_note(recipe: str, row: Dict) -> str:
  """The table's last column: an error, or what the recipe chose."""
  if row.get("error"):
    return "FAILED " + row["error"].replace("|", "/")[:200]
  if recipe == "probe":
    return f"C={row['C']:g}"
  if recipe == "tune":
    return (f"{row['trials']} trials over {row['search_space']}, best "
            f"{row['best_hyperparameters']}; search {row['search_seconds']:.0f}"
            f" s + training {row['train_seconds']:.0f} s")
  if recipe == "defaults":
    return f"stage 1 on {row.get('stage1_mode')}"
  return ""


def format_table(results: Dict) -> str:
  """Markdown: a row per task and recipe."""
  lines = ["| task | recipe | test % | val % | head-only test % | seconds | "
           "note |", "|---|---|---:|---:|---:|---:|---|"]
  for task, rows in results.items():
    for recipe, row in rows.items():
      failed = bool(row.get("error"))
      lines.append(
          f"| {task} | {recipe} | "
          f"{'' if failed else percent(row.get('test_accuracy'))} | "
          f"{'' if failed else percent(row.get('val_accuracy'))} | "
          f"{'' if failed else percent(row.get('head_test_accuracy'))} | "
          f"{row['seconds']:.0f} | {row_note(recipe, row)} |")
  return "\n".join(lines)


# ---------------------------------------------------------------- main


def check_flags() -> str:
  """Fails on bad flags before any work; returns the backbone weights path
  (empty with --make_source, which makes it)."""
  if FLAGS.make_source and FLAGS.backbone_weights:
    sys.exit("bench_transfer: give --backbone_weights or --make_source, not "
             "both.")
  if not FLAGS.make_source:
    if not FLAGS.backbone_weights:
      sys.exit("bench_transfer: --backbone_weights=PATH is required: a "
               "ResNet50(include_top=False, input_shape=(32, 32, 3)) "
               ".weights.h5 pretrained on Fashion-MNIST classes 5-9; "
               "--make_source=PATH makes one (~45 min on 2 cores).")
    if not os.path.isfile(FLAGS.backbone_weights):
      sys.exit(f"bench_transfer: --backbone_weights={FLAGS.backbone_weights!r}"
               ": no such file.")
  require_fashion_mnist(FLAGS.fashion_mnist_dir)
  if FLAGS.make_source:
    return ""
  return os.path.abspath(FLAGS.backbone_weights)


def main(argv):
  del argv
  if FLAGS.run_recipe:
    run_internal_recipe()
    return
  weights = check_flags()
  workdir = os.path.abspath(FLAGS.workdir or tempfile.mkdtemp(
      prefix="bench_transfer-"))
  data_root = os.path.join(workdir, "data")
  runs_root = os.path.join(workdir, "runs")
  os.makedirs(data_root, exist_ok=True)
  print(f"bench_transfer: workdir {workdir}; tasks {FLAGS.tasks}, recipes "
        f"{FLAGS.recipes}; per class {FLAGS.train_per_class} train, "
        f"{FLAGS.val_per_class} val, test {FLAGS.far_test_per_class} (far) / "
        f"{FLAGS.near_test_per_class} (near); seed {FLAGS.seed}; package "
        f"flags {FLAGS.package_flags!r}; {os.cpu_count()} CPUs", flush=True)
  try:
    task_dirs = {task: prepare_task(task, data_root, FLAGS.fashion_mnist_dir)
                 for task in FLAGS.tasks}
    if FLAGS.make_source:
      weights = os.path.abspath(make_source_backbone(data_root, runs_root))
  except ValueError as e:  # Too many images asked of a class.
    sys.exit(f"bench_transfer: {e}")
  results = {}
  for task, task_dir in task_dirs.items():
    run_dir = os.path.join(runs_root, task)
    os.makedirs(run_dir, exist_ok=True)
    results[task] = {}
    for recipe in [r for r in RECIPES if r in FLAGS.recipes]:
      print(f"{task} {recipe}: running; load average "
            f"{os.getloadavg()[0]:.2f}", flush=True)
      row = run_recipe(recipe, task_dir, run_dir, weights)
      results[task][recipe] = row
      print(f"{task} {recipe}: test {percent(row.get('test_accuracy')) or '-'}"
            f" %, {row['seconds']:.0f} s", flush=True)
  print(f"load average after: {os.getloadavg()[0]:.2f}")
  print(format_table(results))
  lines = summary_lines(results)
  output_json = FLAGS.output_json or os.path.join(workdir, "results.json")
  with open(output_json, "w") as f:
    json.dump({"settings": {name: FLAGS[name].value for name in (
        "tasks", "recipes", "seed", "train_per_class", "val_per_class",
        "far_test_per_class", "near_test_per_class", "seed_epochs",
        "package_flags", "make_source_images", "make_source_epochs")},
               "backbone_weights": weights, "task_dirs": task_dirs,
               "results": results,
               "summary": dict(line.split(": ", 1) for line in lines)},
              f, indent=1)
  print(f"results: {output_json}")
  print("\n".join(lines))


if __name__ == "__main__":
  define_flags()
  app.run(main)

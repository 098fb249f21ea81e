"""Benchmark: the tutorials' fine-tuning recipe against this package's defaults.

Runs the same fine-tuning job twice, on the same data, in one invocation:

  tutorial  the recipe of the Keras/TensorFlow transfer-learning guides,
            written out plainly below: freeze the backbone, compile, fit;
            unfreeze the top blocks (BatchNorm kept frozen), recompile at the
            low learning rate, fit on. float32, no XLA, no feature caching.
  package   `train.run_training` with this package's defaults
            (--jit_compile and --mixed_precision on auto, stage head on
            cached features of the un-augmented images).

Same model (`model.build_model`, same seed), same tf.data input
(`data.create_datasets`), same learning rates, epochs and unfrozen blocks.
Each variant runs in its own Python process, so neither inherits the
other's warm caches. Stage seconds are wall-clock and include every fixed
cost: graph tracing, XLA compiles, computing the feature cache, validation.

  python tools/bench_train.py --workdir=/tmp/bench --image_size=64 \\
      --head_epochs=10 --finetune_epochs=2

Without --dataset it generates 1,000 JPEGs (the demo's five shape classes on
noisy backgrounds, 64 px) under WORKDIR/data. The last two lines printed are
`stage1_speedup: R1` and `total_speedup: R` (tutorial seconds / package
seconds, stage head and both stages; medians over `--repeats`).
"""

import json
import os
import statistics
import subprocess
import sys
import time

# The checkout's own package, not whichever tf_finetune is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from tf_finetune import config as config_lib  # noqa: E402

FLAGS = flags.FLAGS
_D = config_lib.Config
flags.DEFINE_string("workdir", "/tmp/bench_train", "Output folder.")
flags.DEFINE_string("dataset", "", "Any --dataset of the package; empty: "
                    "generate --images JPEGs under WORKDIR/data.")
flags.DEFINE_integer("images", 1000, "Images to generate without --dataset.")
flags.DEFINE_integer("image_size", 64, "Input side in pixels.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Batch size.")
flags.DEFINE_integer("head_epochs", 10, "Epochs of stage head.")
flags.DEFINE_integer("finetune_epochs", 2, "Epochs of stage finetune.")
flags.DEFINE_float("head_learning_rate", _D.head_learning_rate, "Stage head.")
flags.DEFINE_float("finetune_learning_rate", 1e-4, "Stage finetune.")
flags.DEFINE_integer("unfreeze_blocks", _D.unfreeze_blocks, "Top blocks.")
flags.DEFINE_string("weights", "none", "imagenet | none | PATH.")
flags.DEFINE_string("augment", ",".join(_D.augment),
                    "Augmentations of both variants (the package's default).")
flags.DEFINE_integer("seed", _D.seed, "Seed of both variants.")
for _name in ("jit_compile", "mixed_precision"):
  flags.DEFINE_string(_name, getattr(_D, _name), "Package variant only.")
flags.DEFINE_bool("cache_features", _D.cache_features, "Package only.")
flags.DEFINE_integer("feature_views", _D.feature_views, "Package only.")
flags.DEFINE_integer("cache_memory_mb", _D.cache_memory_mb, "Package only.")
flags.DEFINE_integer("repeats", 1, "Runs of each variant, in the order "
                     "tutorial, package, package, tutorial, ... so that a "
                     "drifting machine load hits both alike; speedups use "
                     "the median seconds.")
flags.DEFINE_enum("variant", None, ["tutorial", "package"],
                  "Internal: run one variant, write --result_json.")
flags.DEFINE_string("result_json", "", "Internal.")


def make_config(dataset: str, workdir: str) -> config_lib.Config:
  """The job both variants run (speed switches apply to the package only)."""
  return config_lib.Config(
      workdir=workdir, dataset=dataset, image_size=FLAGS.image_size,
      batch_size=FLAGS.batch_size, weights=FLAGS.weights,
      head_epochs=FLAGS.head_epochs, finetune_epochs=FLAGS.finetune_epochs,
      finetune_min_steps=0,
      head_learning_rate=FLAGS.head_learning_rate,
      finetune_learning_rate=FLAGS.finetune_learning_rate,
      unfreeze_blocks=FLAGS.unfreeze_blocks, test_fraction=0.0,
      augment=config_lib.parse_augment(FLAGS.augment), seed=FLAGS.seed,
      jit_compile=FLAGS.jit_compile, mixed_precision=FLAGS.mixed_precision,
      cache_features=FLAGS.cache_features,
      feature_views=FLAGS.feature_views,
      cache_memory_mb=FLAGS.cache_memory_mb).validate()


def generate_images(folder: str, count: int) -> str:
  """`count` JPEGs of the demo's shape classes (once; reused afterwards)."""
  import numpy as np
  import tensorflow as tf
  from tf_finetune import demo_data
  if os.path.isdir(folder):
    return folder
  rng = np.random.default_rng(7)
  names = demo_data.demo_class_names()
  staging = folder + ".tmp"
  for index in range(count):
    name = names[index % len(names)]
    os.makedirs(os.path.join(staging, name), exist_ok=True)
    jpeg = tf.io.encode_jpeg(demo_data.draw_image(name, rng), quality=90)
    with open(os.path.join(staging, name, f"{index:05d}.jpg"), "wb") as f:
      f.write(jpeg.numpy())
  os.rename(staging, folder)
  return folder


# ----------------------------------------------------------------- variants


def _timer():
  """A callback recording (event, index, perf_counter) of every fit."""
  import keras

  class Timer(keras.callbacks.Callback):
    events = []

    def _note(self, event, index=None):
      self.events.append((event, index, time.perf_counter()))

    def on_train_begin(self, logs=None):
      self._note("train_begin")

    def on_train_end(self, logs=None):
      self._note("train_end")

    def on_epoch_end(self, epoch, logs=None):
      self._note("epoch_end", epoch)

    def on_train_batch_begin(self, batch, logs=None):
      self._note("batch_begin", batch)

    def on_train_batch_end(self, batch, logs=None):
      self._note("batch_end", batch)

  return Timer()


def run_tutorial(config) -> dict:
  """The guides' recipe, plain Keras: fit frozen, unfreeze, recompile, fit."""
  import keras
  from tf_finetune import data, model as model_lib, train
  keras.utils.set_random_seed(config.seed)
  datasets = data.create_datasets(config)
  classes = len(datasets.class_names)
  train_ds = train.to_one_hot(datasets.train, classes)
  val_ds = train.to_one_hot(datasets.val, classes)
  model = model_lib.build_model(classes, config.image_size, config.weights,
                                config.dropout, config.seed)
  backbone = model.get_layer("backbone")
  timer = _timer()

  def compile_at(learning_rate):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.CategoricalCrossentropy(
                      label_smoothing=config.label_smoothing),
                  metrics=["accuracy"], jit_compile=False)

  start = time.perf_counter()
  backbone.trainable = False
  compile_at(config.head_learning_rate)
  model.fit(train_ds, validation_data=val_ds, epochs=config.head_epochs,
            callbacks=[timer], verbose=2)
  middle = time.perf_counter()
  backbone.trainable = True
  top = tuple(f"{block}_" for block in
              config_lib.RESNET50_BLOCKS[-config.unfreeze_blocks:])
  for layer in backbone.layers:
    layer.trainable = (config.unfreeze_blocks > 0 and layer.name.startswith(top)
                       and not isinstance(layer,
                                          keras.layers.BatchNormalization))
  compile_at(config.finetune_learning_rate)
  model.fit(train_ds, validation_data=val_ds, epochs=config.total_epochs,
            initial_epoch=config.head_epochs, callbacks=[timer], verbose=2)
  end = time.perf_counter()
  val = model.evaluate(val_ds, verbose=0, return_dict=True)["accuracy"]
  return _result(timer.events, [start, middle, end], val,
                 datasets.num_examples, {})


def run_package(config) -> dict:
  """`train.run_training` as a user runs it (it also exports, saves...)."""
  from tf_finetune import train
  timer = _timer()
  report = train.run_training(config, extra_callbacks=[timer])
  events = timer.events
  head_seconds = report["stages"][0]["seconds"]
  # Stage head starts before its first epoch when it caches features; its
  # reported seconds count from there, up to the end of its last epoch.
  last_head_epoch = [t for e, i, t in events
                     if e == "epoch_end" and i == config.head_epochs - 1][0]
  ends = [t for e, _, t in events if e == "train_end"]
  middle = ends[0] if len(ends) == 2 else last_head_epoch
  bounds = [last_head_epoch - head_seconds, middle, ends[-1]]
  extra = {"speed": report["speed"],
           "feature_cache": report["stages"][0].get("feature_cache"),
           "outside_stages_seconds": report["seconds"] - (
               bounds[2] - bounds[0])}
  return _result(events, bounds, report["val_accuracy"], report[
      "num_examples"], extra)


def _result(events, bounds, val_accuracy, num_examples, extra) -> dict:
  """Where each stage's seconds went, from the timer's events.

  setup: stage start to its first step (compiles, the feature cache, the
  stage switch, iterators); first_step: it includes tracing; other_steps:
  the rest of the train steps; epoch_ends: last step of each epoch to the
  epoch's end (validation, callbacks); the remainder is "other".
  """
  from tf_finetune import speed
  stages = []
  for name, begin, end in (("head", bounds[0], bounds[1]),
                           ("finetune", bounds[1], bounds[2])):
    inside = [(e, t) for e, _, t in events if begin <= t <= end]
    pairs = list(zip(inside, inside[1:]))
    steps = [t1 - t0 for (e0, t0), (e1, t1) in pairs
             if (e0, e1) == ("batch_begin", "batch_end")]
    starts = [t for e, t in inside if e == "batch_begin"]
    stages.append({
        "name": name, "seconds": end - begin,
        "setup": (starts[0] if starts else end) - begin,
        "first_step": steps[0] if steps else 0.0,
        "other_steps": sum(steps[1:]), "steps": len(steps),
        "epoch_ends": sum(t1 - t0 for (e0, t0), (e1, t1) in pairs
                          if (e0, e1) == ("batch_end", "epoch_end"))})
  return {"stages": stages, "val_accuracy": float(val_accuracy),
          "num_examples": num_examples, "peak_rss_mb": speed.peak_rss_mb(),
          **extra}


# ------------------------------------------------------------------ driver


def run_variant(variant: str, dataset: str, run: int) -> dict:
  """Runs one variant in a fresh process; its output goes to a log file."""
  workdir = os.path.join(FLAGS.workdir, f"{variant}{run}")
  result_path = workdir + ".json"
  argv = [a for a in sys.argv[1:] if not a.startswith("--dataset=")]
  command = [sys.executable, os.path.abspath(__file__), *argv,
             f"--dataset={dataset}", f"--variant={variant}",
             f"--result_json={result_path}"]
  log_path = workdir + ".log"
  print(f"{variant}: running (log: {log_path}); load average "
        f"{os.getloadavg()[0]:.2f}", flush=True)
  with open(log_path, "w") as log:
    subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True,
                   env={**os.environ, "BENCH_WORKDIR": workdir})
  with open(result_path) as f:
    return json.load(f)


def print_results(runs: list, epochs: dict) -> None:
  """A row per run and stage; images/s counts every image of every epoch."""
  train = runs[0][1]["num_examples"]["train"]
  print(f"{'':19}{'seconds':>8}{'images/s':>9}{'steps img/s':>12}"
        f"{'setup s':>8}{'1st step s':>11}{'steps s':>8}{'epoch ends s':>13}"
        f"{'other s':>8}")
  for label, result in runs:
    for stage in result["stages"]:
      images = epochs[stage["name"]] * train
      later = images - (stage["first_step"] > 0) * FLAGS.batch_size
      steady = later / stage["other_steps"] if stage["other_steps"] else 0
      other = stage["seconds"] - sum(stage[k] for k in (
          "setup", "first_step", "other_steps", "epoch_ends"))
      print(f"{label + ' ' + stage['name']:19}{stage['seconds']:8.1f}"
            f"{images / stage['seconds']:9.1f}{steady:12.1f}"
            f"{stage['setup']:8.1f}{stage['first_step']:11.1f}"
            f"{stage['other_steps']:8.1f}{stage['epoch_ends']:13.1f}"
            f"{other:8.1f}")
  for label, result in runs:
    print(f"{label} val_accuracy: {result['val_accuracy']:.4f}, peak RSS "
          f"{result['peak_rss_mb']:.0f} MB")
  package = [result for label, result in runs if "package" in label][-1]
  print(f"package switches: {json.dumps(package['speed'])}")
  if package.get("feature_cache"):
    print(f"package feature cache: {json.dumps(package['feature_cache'])}")
  print(f"package outside the stages (data listing, model build, evaluate, "
        f"save, export, report): {package['outside_stages_seconds']:.1f} s, "
        "not counted")


def main(argv):
  del argv
  if FLAGS.variant:
    dataset_config = make_config(FLAGS.dataset, os.environ["BENCH_WORKDIR"])
    run = run_tutorial if FLAGS.variant == "tutorial" else run_package
    result = run(dataset_config)
    with open(FLAGS.result_json, "w") as f:
      json.dump(result, f)
    return
  os.makedirs(FLAGS.workdir, exist_ok=True)
  dataset = FLAGS.dataset or "folder:" + generate_images(
      os.path.join(FLAGS.workdir, "data", f"shapes-{FLAGS.images}"),
      FLAGS.images)
  make_config(dataset, FLAGS.workdir)  # Bad flags fail before any training.
  print(f"bench_train: {dataset}, {FLAGS.image_size} px, batch "
        f"{FLAGS.batch_size}, head_epochs={FLAGS.head_epochs}, finetune_epochs="
        f"{FLAGS.finetune_epochs}, unfreeze_blocks={FLAGS.unfreeze_blocks}, "
        f"weights={FLAGS.weights}, augment={FLAGS.augment}; "
        f"{os.cpu_count()} CPUs", flush=True)
  order = [("tutorial", "package"), ("package", "tutorial")]
  runs = []
  for run in range(FLAGS.repeats):
    for variant in order[run % 2]:
      runs.append((f"{variant}#{run + 1}", run_variant(variant, dataset, run)))
  print(f"load average after: {os.getloadavg()[0]:.2f}")
  print_results(runs, {"head": FLAGS.head_epochs,
                       "finetune": FLAGS.finetune_epochs})
  stage1, total = {}, {}
  for variant in ("tutorial", "package"):
    seconds = [[s["seconds"] for s in result["stages"]]
               for label, result in runs if label.startswith(variant)]
    stage1[variant] = statistics.median(s[0] for s in seconds)
    total[variant] = statistics.median(sum(s) for s in seconds)
  print(f"stage1_speedup: {stage1['tutorial'] / stage1['package']:.2f}")
  print(f"total_speedup: {total['tutorial'] / total['package']:.2f}")


if __name__ == "__main__":
  app.run(main)

r"""Input pipeline benchmark: tf_finetune's pipeline against the tutorial one.

    python tools/bench_input.py --dataset=folder:DIR --image_size=224
    python tools/bench_input.py --generate          # ~1000 JPEGs of 500x375

Measures, in one run and on the same files:

  1. the up-front check of a folder source (list, decode every file once,
     split): files/second, what that means for 100,000 files, and the time
     of a second run that reuses the saved results;
  2. images/second over two epochs of this package's training pipeline
     (`data.files_pipeline`, default augmentation) and of the tutorial
     baseline: `keras.utils.image_dataset_from_directory`, then `map` of the
     Keras augmentation layers a tutorial would write for the same
     `--augment` names (RandomFlip, RandomRotation, RandomZoom, ...), then
     `prefetch`. For reference also the baseline with this package's
     augmenter, which separates the gain of the pipeline's structure
     (parallel decode, cache, uint8 batches) from that of the fused
     augmentation. Epoch k of every pipeline runs before epoch k + 1 of
     any, so that drifting background load does not favour one;
  3. the fraction of a training step spent waiting on input while training
     the demo model (ResNet50, `--weights=none`, stage "head": the frozen
     backbone has the shortest steps, so it is the hardest case): the time
     `next()` blocks over the step time, in steady state (cached) and while
     every step decodes (uncached, as the first epoch or data too big to
     cache). Also, for reference, the slowdown against steps on one batch
     already in memory, in alternating rounds so that background load
     drifts out; on this CPU-only machine it includes the CPU the pipeline
     takes from the model.

The last two lines are `input_bound_fraction: F` and
`pipeline_vs_baseline: R` (ratio of the second-epoch images/second).
Timings are wall-clock and share the machine with whatever else runs: the
load average is printed before and after.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras
import numpy as np
import tensorflow as tf

from tf_finetune import augment, data, folder_source, stages
from tf_finetune.config import Config
from tf_finetune.model import build_model
from tf_finetune.train import to_one_hot

_D = Config(workdir="unused")
flags.DEFINE_string("dataset", "", "folder:DIR to measure; empty: generate.")
flags.DEFINE_bool("generate", False, "Generate JPEGs into a temp folder.")
flags.DEFINE_integer("num_images", 1000, "Images to generate.")
flags.DEFINE_integer("image_size", 224, "Input side in pixels.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_string("augment", ",".join(_D.augment), "Augmentation names.")
flags.DEFINE_integer("seed", 42, "Seed.")
flags.DEFINE_integer("wait_images", 256, "Images the step-time rounds cycle "
                     "through (cached after the first pass).")
flags.DEFINE_integer("wait_rounds", 4, "Alternating rounds of step timing.")
flags.DEFINE_integer("wait_steps", 3, "Steps per round and input kind.")
FLAGS = flags.FLAGS

# What a tutorial writes for each --augment name: one stock layer each.
_TUTORIAL_LAYERS = {
    "flip": lambda: [keras.layers.RandomFlip("horizontal")],
    "rotation": lambda: [keras.layers.RandomRotation(0.1, fill_mode="reflect")],
    "zoom": lambda: [keras.layers.RandomZoom(0.2, fill_mode="reflect")],
    "crop": lambda: [keras.layers.RandomTranslation(0.15, 0.15,
                                                    fill_mode="reflect"),
                     keras.layers.RandomZoom((-0.3, 0.0), (-0.3, 0.0),
                                             fill_mode="reflect")],
    "contrast": lambda: [keras.layers.RandomContrast(0.2)],
    "brightness": lambda: [keras.layers.RandomBrightness(0.2,
                                                         value_range=(0, 255))],
    "randaugment": lambda: [keras.layers.RandAugment(value_range=(0, 255))],
}


def generate_jpegs(folder, count, seed, classes=5, height=375, width=500):
  """Writes `count` photo-like JPEGs (smooth colour fields, a shape, noise)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  for index in range(count):
    label = index % classes
    coarse = rng.uniform(30, 220, (6, 8, 3)).astype(np.float32)
    field = tf.image.resize(coarse, [height, width], method="bicubic").numpy()
    cy, cx, r = rng.uniform(80, 295), rng.uniform(80, 420), rng.uniform(30, 80)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2 if label % 2 else (
        (abs(yy - cy) < r) & (abs(xx - cx) < r))
    field[mask] = rng.uniform(0, 255, 3) * 0.5 + 40 * label
    field += rng.normal(0, 6, field.shape)
    pixels = np.clip(field, 0, 255).astype(np.uint8)
    path = os.path.join(folder, f"class_{label}", f"img_{index:05d}.jpg")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_jpeg(pixels, quality=90))


def tutorial_pipeline(root, config, augmenter=None):
  """image_dataset_from_directory + map(augmentation) + prefetch."""
  dataset = keras.utils.image_dataset_from_directory(
      root, image_size=(config.image_size, config.image_size),
      batch_size=config.batch_size, shuffle=True, seed=config.seed,
      verbose=False)
  if augmenter is not None:  # This package's augmenter, on uint8.
    dataset = dataset.map(
        lambda x, y: (augment.augment_batch(augmenter, tf.cast(x, tf.uint8)),
                      y), num_parallel_calls=tf.data.AUTOTUNE)
  else:
    layers = keras.Sequential([layer for name in config.augment
                               for layer in _TUTORIAL_LAYERS[name]()])
    dataset = dataset.map(lambda x, y: (layers(x, training=True), y),
                          num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.prefetch(tf.data.AUTOTUNE)


def measure_pass(dataset):
  """(images/second, CPU milliseconds per image) of one full pass.

  CPU time (all threads of this process) is much less sensitive than wall
  time to what else runs on the machine, so it backs up the ratio.
  """
  wall, cpu, count = time.perf_counter(), time.process_time(), 0
  for _, labels in dataset:
    count += int(labels.shape[0])
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return count / wall, 1000 * cpu / count


def interleaved_epochs(pipelines, epochs=2):
  """{name: [(images/second, CPU ms/image) of epoch 1, 2, ...]}; epoch k of
  every pipeline runs before epoch k + 1 of any, so that drifting
  background load hits all of them."""
  results = {name: [] for name in pipelines}
  for _ in range(epochs):
    for name, dataset in pipelines.items():
      results[name].append(measure_pass(dataset))
  return results


def time_check(root, config):
  """Seconds of `list_folder_splits` (list, check, split) and its result."""
  started = time.perf_counter()
  result = folder_source.list_folder_splits(root, config)
  return time.perf_counter() - started, result


def step_times(model, dataset, config, rounds, steps):
  """Per-step seconds: (real input, one in-memory batch, next() alone)."""
  iterator = iter(dataset.repeat())
  fixed = next(iterator)
  model.train_on_batch(*fixed)  # Traces the train step.
  for _ in range(FLAGS.wait_images // config.batch_size + 1):
    next(iterator)  # A full pass: fills the cache, if any.
  real, memory, waits = [], [], []
  for _ in range(rounds):
    for _ in range(steps):
      started = time.perf_counter()
      batch = next(iterator)
      waits.append(time.perf_counter() - started)
      model.train_on_batch(*batch)
      real.append(time.perf_counter() - started)
    for _ in range(steps):
      started = time.perf_counter()
      model.train_on_batch(*fixed)
      memory.append(time.perf_counter() - started)
  return real, memory, waits


def input_bound(model, files, config, num_classes, cache):
  """(waiting fraction, slowdown, real step s, in-memory step s, wait s).

  The waiting fraction is the time `next()` blocks over the step time with
  real input: what the step waits for input. The slowdown (1 - in-memory
  step / real step) also counts the CPU the pipeline takes from the model
  on a CPU-only machine, and is noisier.
  """
  augmenter = augment.build_augmenter(config.augment, config.seed)
  dataset = to_one_hot(
      data.files_pipeline(files[:FLAGS.wait_images], config, num_classes,
                          training=True, augmenter=augmenter, cache=cache),
      num_classes)
  real, memory, waits = step_times(model, dataset, config, FLAGS.wait_rounds,
                                   FLAGS.wait_steps)
  real_step, memory_step = statistics.median(real), statistics.median(memory)
  wait = sum(waits) / len(waits)
  return (wait / (sum(real) / len(real)), 1 - memory_step / real_step,
          real_step, memory_step, wait)


def resolve_folder(scratch):
  """The folder to measure: --dataset, or JPEGs generated into `scratch`."""
  if FLAGS.dataset and not FLAGS.generate:
    if not FLAGS.dataset.startswith("folder:"):
      raise app.UsageError("--dataset must be folder:DIR")
    return FLAGS.dataset.split(":", 1)[1]
  root = os.path.join(scratch, "images")
  started = time.perf_counter()
  generate_jpegs(root, FLAGS.num_images, FLAGS.seed)
  print(f"generated {FLAGS.num_images} JPEGs 500x375 in {root} "
        f"({time.perf_counter() - started:.0f} s)")
  return root


def report_check(root, config):
  """Prints the up-front check's speed; returns (class names, all files)."""
  # TensorFlow's one-off start-up (thread pools, ...) happens before the
  # check in a training run too: not counted.
  tf.data.Dataset.range(1).map(lambda x: x + 1).get_single_element()
  # A fresh --data_dir: the first check finds no earlier results (cold), the
  # second reuses them (warm), as a later run on the same folder would.
  cold, (class_names, splits, skipped) = time_check(root, config)
  warm, _ = time_check(root, config)
  files = sorted(f for split in splits.values() for f in split)
  checked = len(files) + len(skipped)
  rate = checked / cold
  print(f"up-front check (list, decode every file, split): {checked} files "
        f"({len(skipped)} skipped) in {cold:.2f} s = {rate:.0f} files/s, "
        f"100,000 files: {100_000 / rate:.0f} s; again with the saved "
        f"results: {warm:.2f} s = {checked / warm:.0f} files/s")
  print(f"validation_files_per_second: {rate:.0f}")
  return class_names, files


def report_throughput(root, files, config, num_classes):
  """Prints images/second per epoch; returns the pipeline_vs_baseline ratio."""
  results = interleaved_epochs({
      "pipeline": data.files_pipeline(
          files, config, num_classes, training=True,
          augmenter=augment.build_augmenter(config.augment, config.seed)),
      "baseline": tutorial_pipeline(root, config),
      "baseline_with_our_augmenter": tutorial_pipeline(
          root, config, augment.build_augmenter(config.augment, config.seed)),
  })
  for name, epochs in results.items():
    print(f"{name}: " + ", ".join(
        f"epoch {i + 1} {rate:.0f} img/s ({cpu:.1f} CPU ms/img)"
        for i, (rate, cpu) in enumerate(epochs)))
  ours, base = results["pipeline"][-1], results["baseline"][-1]
  other = results["baseline_with_our_augmenter"][-1]
  print(f"pipeline_vs_baseline_with_our_augmenter: {ours[0] / other[0]:.2f}")
  print(f"pipeline_vs_baseline_cpu (CPU time per image, epoch 2): "
        f"{base[1] / ours[1]:.2f}; with our augmenter: "
        f"{other[1] / ours[1]:.2f}")
  return ours[0] / base[0]


def report_input_bound(files, config, num_classes):
  """Prints step timings; returns the (cached, uncached) waiting fractions."""
  keras.utils.set_random_seed(config.seed)
  model = build_model(num_classes, config.image_size, "none", config.dropout,
                      config.seed)
  stages.apply_stage(model, stages.StagePlan.from_config(config), stages.HEAD)
  uncached = input_bound(model, files, config, num_classes, cache=False)
  cached = input_bound(model, files, config, num_classes, cache=None)
  for name, (fraction, slowdown, real, memory, wait) in (
      ("uncached (decoding every step)", uncached),
      ("cached (epochs after the first)", cached)):
    print(f"train step, {name}: {real:.3f} s with the pipeline, "
          f"{memory:.3f} s on an in-memory batch (slowdown {slowdown:.3f}); "
          f"next() blocks {wait * 1000:.1f} ms = {fraction:.3f} of a step")
  return cached[0], uncached[0]


def main(argv):
  del argv
  print(f"load average before: {os.getloadavg()[0]:.2f} (cores: "
        f"{os.cpu_count()})")
  scratch = tempfile.mkdtemp(prefix="bench_input_")
  try:
    root = resolve_folder(scratch)
    names = tuple(n for n in FLAGS.augment.split(",") if n and n != "none")
    config = Config(workdir=os.path.join(scratch, "work"),
                    dataset=f"folder:{root}",
                    data_dir=os.path.join(scratch, "data"),
                    image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
                    augment=names, weights="none", seed=FLAGS.seed).validate()
    class_names, files = report_check(root, config)
    ratio = report_throughput(root, files, config, len(class_names))
    cached, uncached = report_input_bound(files, config, len(class_names))
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print(f"load average after: {os.getloadavg()[0]:.2f}")
  print(f"input_bound_fraction_uncached: {uncached:.3f}")
  print(f"input_bound_fraction: {cached:.3f}")
  print(f"pipeline_vs_baseline: {ratio:.2f}")


if __name__ == "__main__":
  app.run(main)

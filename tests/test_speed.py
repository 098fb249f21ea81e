"""Speed switches: stage head on cached features, mixed precision, XLA and
flag checks. Real ResNet50 at 32 px, weights=none, few images."""

import dataclasses
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli
from test_fault_tolerance import epochs_of
from tf_finetune import data, features, selection, speed, stages, train
from tf_finetune import model as model_lib
from tf_finetune.config import Config, UserError

# Train the ResNet50 in both stages, in process and through the command
# line: the tests using them are `slow` (conftest.py).
SLOW_FIXTURES = {"two_stage_runs", "cached_cli_run"}

SIZE, CLASSES, COUNT = 32, 3, 16


def _images_and_labels(count=COUNT, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)
  labels = keras.utils.to_categorical(rng.permutation(count) % CLASSES,
                                      CLASSES).astype("float32")
  return images, labels


def _dataset(images, labels, batch_size, seed=1):
  """Shuffled every pass, as the training split is: the cache must keep each
  feature with its own label."""
  return tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(
      len(images), seed=seed, reshuffle_each_iteration=True).batch(batch_size)


def _build(seed=0, dropout=0.0):
  keras.utils.set_random_seed(seed)
  return model_lib.build_model(CLASSES, SIZE, "none", dropout=dropout)


def _fit_stages(model, plan, images, labels, workdir, batch_size=COUNT,
                callbacks=(), unaugmented=None, **config):
  """`train.fit_stages` (the training run's own path) on in-memory data."""
  # Steps per epoch as a training run counts them: fits on images take
  # that many batches of `train_from` per epoch.
  plan = dataclasses.replace(plan, steps_per_epoch=math.ceil(COUNT /
                                                             batch_size))
  callback = stages.TwoStageCallback(plan, stages.HEAD, COUNT, batch_size)
  batches = _dataset(images, labels, batch_size)
  datasets = data.Datasets(
      train=batches, train_from=epochs_of(batches),
      val=_dataset(images, labels, 8), test=None,
      class_names=[str(c) for c in range(CLASSES)],
      num_examples={"train": COUNT, "val": COUNT, "test": 0},
      skipped_files=[], train_unaugmented=unaugmented)
  config = Config(workdir=str(workdir), head_epochs=plan.head_epochs,
                  finetune_epochs=plan.finetune_epochs,
                  batch_size=batch_size, cache_memory_mb=64,
                  **{"augment": (), "probe_head": False, **config})
  run = train.Run(config, None, plan, datasets, model)
  # Watches a metric never logged, so keeps no epoch: these tests follow the
  # weights from epoch to epoch (test_selection.py tests the keeping).
  best = selection.BestWeights(plan, model, monitor="not_logged")
  train.fit_stages(run, callback, best, callbacks, verbose=0)
  return callback


def _head_weights(model):
  return [w.numpy().copy() for w in model.get_layer("classifier").weights]


@pytest.fixture(scope="module")
def head_stage_model():
  model = _build()
  stages.apply_stage(model, stages.StagePlan(1, 0, 1e-3, 1e-4, 0),
                     stages.HEAD)
  return model


@pytest.mark.parametrize("budget_bytes", [1 << 30, 0], ids=["memory", "disk"])
def test_cached_features_give_the_head_the_same_gradients(
    head_stage_model, tmp_path, budget_bytes):
  model = head_stage_model
  images, labels = _images_and_labels()
  cache = features.FeatureCache(str(tmp_path / "cache"), budget_bytes)
  view = cache.store("view", features.make_feature_extractor(model),
                     _dataset(images, labels, 5),
                     keras.utils.Progbar(None, verbose=0))
  assert (view.path is None) == (budget_bytes > 0)
  cached_features, cached_labels = next(iter(view.dataset().batch(COUNT)))
  loss = keras.losses.CategoricalCrossentropy()
  head = features.build_head_model(model)
  with tf.GradientTape() as tape:
    cached_loss = loss(cached_labels, head(cached_features, training=True))
  cached = tape.gradient(cached_loss, head.trainable_variables)
  with tf.GradientTape() as tape:
    full_loss = loss(labels, model(images, training=True))
  uncached = tape.gradient(full_loss, model.trainable_variables)
  assert ([v.path for v in head.trainable_variables]
          == [v.path for v in model.trainable_variables]
          == ["classifier/kernel", "classifier/bias"])
  np.testing.assert_allclose(float(cached_loss), float(full_loss), rtol=1e-5)
  for a, b in zip(cached, uncached):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
  cache.close()
  assert not os.path.exists(tmp_path / "cache")


@pytest.fixture(scope="module")
def two_stage_runs(tmp_path_factory):
  """The same two head epochs on images and on cached features (one batch
  per epoch, so batch order cannot matter), the cached run continuing into
  one finetune epoch on images."""
  images, labels = _images_and_labels()
  plan = stages.StagePlan(2, 1, 1e-2, 1e-4, 1)
  head_only = stages.StagePlan(2, 0, 1e-2, 1e-4, 1)

  uncached = _build()
  stages.apply_stage(uncached, head_only, stages.HEAD)
  uncached.fit(_dataset(images, labels, COUNT), epochs=2, verbose=0,
               shuffle=False,
               callbacks=[stages.TwoStageCallback(head_only, stages.HEAD,
                                                  COUNT, COUNT)])

  cached = _build()
  initial = _head_weights(cached)
  stages.apply_stage(cached, plan, stages.HEAD)
  seen, trained = {}, {}

  class Snapshot(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      seen[epoch] = (self.model.name, _head_weights(cached))

    def on_epoch_end(self, epoch, logs=None):
      trained[epoch] = [w.numpy().copy() for w in self.model.layers[-1].weights]

  csv = str(tmp_path_factory.mktemp("logs") / "training.csv")
  callback = _fit_stages(cached, plan, images, labels,
                         tmp_path_factory.mktemp("work"),
                         callbacks=[Snapshot(), keras.callbacks.CSVLogger(csv)])
  return dict(initial=initial, uncached=_head_weights(uncached), seen=seen,
              trained=trained,
              final=_head_weights(cached), reports=callback.stage_reports(),
              csv=csv)


def test_stage_head_on_cached_features_trains_as_on_images(two_stage_runs):
  runs = two_stage_runs
  # What stage finetune starts from is what stage head trained.
  _, at_finetune = runs["seen"][2]
  for cached, uncached, initial in zip(at_finetune, runs["uncached"],
                                       runs["initial"]):
    np.testing.assert_allclose(cached, uncached, rtol=1e-4, atol=1e-6)
    assert np.abs(cached - initial).max() > 1e-3  # Stage head did train.


def test_head_weights_are_carried_into_stage_finetune(two_stage_runs):
  runs = two_stage_runs
  # Callbacks see the full model in both stages, though stage head fits the
  # head model.
  assert {name for name, _ in runs["seen"].values()} == {"classifier_model"}
  _, at_finetune = runs["seen"][2]
  for start, end_of_head, initial in zip(at_finetune, runs["trained"][1],
                                         runs["initial"]):
    np.testing.assert_array_equal(start, end_of_head)
    assert not np.array_equal(start, initial)
  # The head keeps training in stage finetune, from where stage head ended.
  assert any(np.abs(a - b).max() > 0 for a, b in zip(runs["final"],
                                                      at_finetune))


def test_two_fits_report_and_log_like_one(two_stage_runs):
  head, finetune = two_stage_runs["reports"]
  assert (head["name"], finetune["name"]) == ("head", "finetune")
  assert (head["input"], finetune["input"]) == ("cached_features", "images")
  assert head["feature_cache"]["views"] == 1
  assert head["feature_cache"]["train_examples"] == COUNT
  assert head["feature_cache"]["val_examples"] == COUNT
  assert head["trainable_params"] == 2048 * CLASSES + CLASSES
  assert finetune["trainable_params"] > head["trainable_params"]
  assert [len(r["history"]["val_loss"]) for r in (head, finetune)] == [2, 1]
  assert head["history"]["learning_rate"] == pytest.approx([1e-2, 1e-2])
  assert head["peak_rss_mb"] > 100 and finetune["peak_rss_mb"] > 100
  assert head["images_per_second"] > 0  # Finetune's one step is its first.
  # The stage switch includes the caching time in stage head's seconds.
  assert head["seconds"] > head["feature_cache"]["seconds"] > 0
  with open(two_stage_runs["csv"]) as f:
    epochs = [line.split(",")[0] for line in f.read().splitlines()[1:]]
  assert epochs == ["0", "1", "2"]


def test_views_take_turns_by_epoch_and_reshuffle(tmp_path):
  """Epoch e trains on view e mod K, in a new order each time round."""
  cache = features.FeatureCache(str(tmp_path), 1 << 20)
  views = []
  for v in range(2):
    ids = np.arange(6, dtype="float32")[:, None] + 100 * v
    data = tf.data.Dataset.from_tensor_slices((ids, ids)).batch(4)
    views.append(cache.store(f"v{v}", lambda x: x, data,
                             keras.utils.Progbar(None, verbose=0)))
  dataset, steps = features.training_dataset(views, first_epoch=1,
                                             batch_size=4, seed=0)
  assert steps == 2
  batches = [b[0].numpy().ravel() for b in dataset.take(3 * steps)]
  epochs = [np.concatenate(batches[i:i + steps]) for i in range(0, 6, steps)]
  assert sorted(epochs[0]) == list(range(100, 106))  # Epoch 1: view 1.
  assert sorted(epochs[1]) == list(range(6))         # Epoch 2: view 0.
  assert sorted(epochs[2]) == list(range(100, 106))
  assert list(epochs[0]) != list(epochs[2])


@pytest.mark.slow
def test_mixed_float16_keeps_float32_outputs_and_scales_the_loss(tmp_path):
  with speed.dtype_policy("mixed_float16"):
    model = _build(dropout=0.2)
  assert keras.mixed_precision.global_policy().name == "float32"  # No leak.
  assert model_lib.get_backbone(model).compute_dtype == "float16"
  assert model.output.dtype == "float32"
  plan = stages.StagePlan(1, 0, 1e-3, 1e-4, 0)
  stages.apply_stage(model, plan, stages.HEAD)
  # Compile wraps Adam in a LossScaleOptimizer; built before the first step.
  assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
  assert model.optimizer.built
  images, labels = _images_and_labels()
  callback = _fit_stages(model, plan, images, labels, tmp_path, batch_size=8)
  head = features.build_head_model(model)
  assert head.input.dtype == "float16" and head.output.dtype == "float32"
  assert np.isfinite(callback.stage_reports()[0]["history"]["loss"]).all()
  assert model.predict(images[:2], verbose=0).dtype == np.float32


def _config(**overrides):
  return Config(workdir="w", **overrides).validate()


@pytest.mark.parametrize("overrides, culprit", [
    (dict(augment=(), feature_views=2), "--augment=none"),
    (dict(augment=("flip",), feature_views=6, head_epochs=5),
     "--feature_views=6 exceeds --head_epochs=5"),
    (dict(feature_views=0), "--feature_views=0"),
    (dict(cache_memory_mb=-1), "--cache_memory_mb=-1"),
    (dict(jit_compile="yes"), "--jit_compile='yes'"),
    (dict(mixed_precision="float16"), "--mixed_precision='float16'"),
])
def test_contradictory_speed_flags_are_refused(overrides, culprit):
  with pytest.raises(UserError, match=culprit):
    _config(**overrides)


@pytest.mark.parametrize("overrides, cached", [
    (dict(augment=()), True),
    (dict(augment=("flip",)), True),  # One view: the un-augmented images.
    (dict(augment=("flip",), feature_views=3), True),
    (dict(augment=(), cache_features=False), False),
    (dict(augment=(), head_epochs=0), False),
    # Views are only checked when they are used.
    (dict(augment=(), feature_views=2, cache_features=False), False),
])
def test_stage_head_caches_unless_told_not_to(overrides, cached):
  assert _config(**overrides).caches_features == cached


def test_one_view_caches_the_unaugmented_images(head_stage_model, tmp_path):
  """With --feature_views=1 stage head sees the images as they are, not one
  frozen augmented copy; with K >= 2 each view is a new augmented pass."""
  model = head_stage_model
  images, labels = _images_and_labels()
  plain = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
  passes = []

  def augment(x, y):  # Stands for --augment: a different image every pass.
    passes.append(1)
    return 255 - x, y
  augmented = plain.map(lambda x, y: tf.py_function(
      augment, [x, y], (tf.uint8, tf.float32)))
  plan = stages.StagePlan(2, 0, 1e-3, 1e-4, 0)
  callback = stages.TwoStageCallback(plan, stages.HEAD, COUNT, 8)
  for views, source in ((1, images), (2, 255 - images)):
    settings = features.CacheSettings(views, 8, 64, str(tmp_path))
    with features.CachedHeadStage(model, plan, callback, settings, augmented,
                                  plain, None, verbose=0) as stage:
      stage.fit(0, 1, 0, [callback])
      assert len(stage.views) == views
      expected = features.make_feature_extractor(model)(source).numpy()
      for view in stage.views:
        np.testing.assert_allclose(view.arrays[0], expected, rtol=1e-5,
                                   atol=1e-5)
  assert len(passes) == 2 * (COUNT // 8)  # Only the K = 2 views augmented.


def test_auto_switches_follow_the_hardware():
  assert speed.choose_jit_compile("auto", has_gpu=False)[0] is False
  assert speed.choose_jit_compile("auto", has_gpu=True)[0] is True
  assert speed.choose_jit_compile("auto", has_gpu=True, replicas=2)[0] is False
  assert speed.choose_jit_compile("true", has_gpu=False)[0] is True
  on, why = speed.choose_jit_compile("true", False, unsupported="no XLA")
  assert not on and "no XLA" in why
  assert speed.choose_mixed_precision("auto", [])[0] == "float32"
  assert speed.choose_mixed_precision("auto", [(8, 0), (7, 5)])[0] == (
      "mixed_float16")
  assert speed.choose_mixed_precision("auto", [(8, 0), (6, 1)])[0] == "float32"
  assert speed.choose_mixed_precision("mixed_bfloat16", [])[0] == (
      "mixed_bfloat16")


@pytest.fixture(scope="module")
def cached_cli_run(tmp_path_factory):
  """The CLI with stage head on cached features, all of them on disk."""
  base = tmp_path_factory.mktemp("cached")
  workdir = str(base / "work")
  result = run_cli("--flagfile=configs/smoke.cfg", f"--workdir={workdir}",
                   f"--data_dir={base / 'data'}", "--augment=none",
                   "--head_epochs=2", "--cache_memory_mb=0")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "report.json")) as f:
    return workdir, json.load(f), result.stderr


def test_cli_run_reports_the_stage1_mode_and_costs(cached_cli_run):
  workdir, report, log = cached_cli_run
  assert report["stage1_mode"] == report["speed"]["stage1_mode"] == (
      "cached_features")
  assert report["speed"]["jit_compile"] is False  # auto, on a CPU
  assert report["speed"]["mixed_precision"] == "float32"
  assert report["peak_rss_mb"] >= max(s["peak_rss_mb"]
                                      for s in report["stages"]) > 100
  head, finetune = report["stages"]
  cache = head["feature_cache"]
  assert cache["memory_mb"] == 0 and cache["disk_mb"] > 0
  assert cache["train_examples"] == report["num_examples"]["train"]
  assert not os.path.exists(os.path.join(workdir, features.CACHE_DIR))
  assert set(report["images_per_second"]) == {"head", "finetune"}
  assert [len(s["history"]["loss"]) for s in report["stages"]] == [2, 1]
  for stage in ("head", "finetune"):
    assert f"Stage {stage}: " in log and "peak RSS" in log
  assert "XLA (--jit_compile=auto): off" in log


def test_cli_run_logs_one_epoch_axis_across_both_fits(cached_cli_run):
  workdir, _, _ = cached_cli_run
  with open(os.path.join(workdir, "logs", "training.csv")) as f:
    assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == [
        "0", "1", "2"]
  steps = set()
  train_logs = os.path.join(workdir, "logs", "train")
  for name in os.listdir(train_logs):
    for event in tf.compat.v1.train.summary_iterator(
        os.path.join(train_logs, name)):
      steps.update(event.step for v in event.summary.value
                   if v.tag == "epoch_loss")
  assert steps == {0, 1, 2}


def test_default_run_trains_stage_head_on_unaugmented_features(smoke_run):
  workdir, _ = smoke_run  # --augment=flip, the caching flags at defaults.
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  assert report["stage1_mode"] == "cached_features"
  assert [s["input"] for s in report["stages"]] == ["cached_features",
                                                   "images"]
  assert report["stages"][0]["feature_cache"]["views"] == 1


@pytest.mark.slow
def test_cli_refuses_views_that_would_never_be_used(tmp_path):
  result = run_cli("--flagfile=configs/smoke.cfg", f"--workdir={tmp_path}",
                   "--feature_views=2", timeout=60)
  assert result.returncode == 2
  assert "--feature_views=2 exceeds --head_epochs=1" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_bench_train_prints_both_recipes_and_the_speedups(tmp_path):
  """The benchmark tool end to end at toy size (no timing asserted)."""
  import re
  import subprocess
  import sys
  from conftest import ROOT
  result = subprocess.run(
      [sys.executable, "tools/bench_train.py", f"--workdir={tmp_path}",
       "--images=40", "--image_size=32", "--head_epochs=2",
       "--finetune_epochs=1", "--unfreeze_blocks=1", "--batch_size=16"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert re.fullmatch(r"stage1_speedup: \d+\.\d\d", lines[-2])
  assert re.fullmatch(r"total_speedup: \d+\.\d\d", lines[-1])
  for row in ("tutorial#1 head", "tutorial#1 finetune", "package#1 head",
              "package#1 finetune"):
    assert any(line.startswith(row) for line in lines), row
  assert '"stage1_mode": "cached_features"' in result.stdout
  assert sum("val_accuracy" in line for line in lines) == 2

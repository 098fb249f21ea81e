"""Stage head on cached backbone features (`--cache_features`).

In stage "head" the backbone is frozen and runs in inference mode (every
BatchNormalization layer is non-trainable, see stages.py), so its pooled
output is a pure function of the input image. The tutorials' recipe still
pushes every image through the whole ResNet50 in every epoch, validation
included. Here each training image goes through it once per view (K views,
`--feature_views`), each validation image once, and the head trains on the
cached features; head epoch e trains on view e mod K, reshuffled:

  images --backbone, once per view--> cache --E head epochs--> head

The head model is made of the full model's own head layers (Dropout, Dense),
not copies, so the weights it trains ARE the full model's. Stage "finetune"
then continues on images with `model.fit(initial_epoch=head_epochs)`: one
epoch axis, the same callbacks (TwoStageCallback records, CSV, TensorBoard)
and the same report as a single `fit` would give.

Storage: in memory up to `--cache_memory_mb`; a view that would exceed it
goes whole to a TFRecord file under WORKDIR/feature_cache/, which is deleted
when stage head ends.
"""

import functools
import math
import os
import shutil
import sys
import time
from typing import Callable, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_finetune import stages
from tf_finetune.model import FEATURES_NAME

CACHE_DIR = "feature_cache"
# Shuffle buffer (examples) of a view cached on disk: bounded, because the
# view is on disk for want of memory.
DISK_SHUFFLE_BUFFER = 10_000


def choose_fit(model: keras.Model, config, plan: stages.StagePlan,
               switches, stage_callback: stages.TwoStageCallback) -> Callable:
  """The function that runs both stages, called like `model.fit`.

  `model.fit` itself when stage head trains on images; otherwise
  `fit_with_cached_features` bound to this run's model and settings.
  """
  if switches.stage1_mode != "cached_features":
    return model.fit
  return functools.partial(
      fit_with_cached_features, model, plan=plan,
      stage_callback=stage_callback, views=switches.feature_views,
      batch_size=config.batch_size, memory_mb=config.cache_memory_mb,
      cache_dir=os.path.join(config.workdir, CACHE_DIR), seed=config.seed)


def fit_with_cached_features(model: keras.Model, x: tf.data.Dataset,
                             validation_data: Optional[tf.data.Dataset] = None,
                             epochs: int = 1, callbacks: Sequence = (),
                             verbose="auto", initial_epoch: int = 0, *,
                             plan: stages.StagePlan,
                             stage_callback: stages.TwoStageCallback,
                             views: int, batch_size: int, memory_mb: float,
                             cache_dir: str, seed: int = 0):
  """Stage head on cached features, then stage finetune on images.

  Args:
    model: from `model.build_model`, compiled for stage head.
    x: batches of (uint8 images, one-hot labels), as `model.fit` takes
      them; if it augments, every pass over it is a new view.
    validation_data: batches like `x`, or None.
    epochs, callbacks, verbose, initial_epoch: as for `model.fit`, over
      both stages. From `initial_epoch >= plan.head_epochs` on (a resumed
      run), nothing is cached.
    plan: the stage plan; `stage_callback` must be among `callbacks`.
    views: augmented views per training image (K).
    batch_size: batch size of the head's training on features.
    memory_mb: cache held in memory up to this size; beyond, on disk.
    cache_dir: folder for the on-disk part; removed afterwards.
    seed: shuffles the cached features.

  Returns:
    The History of the last `fit`.
  """
  head_end = min(plan.head_epochs, epochs)
  history = None
  if initial_epoch < head_end:
    cache = FeatureCache(cache_dir, memory_mb * (1 << 20))
    try:
      history = _fit_head_on_features(
          model, x, validation_data, head_end, callbacks, verbose,
          initial_epoch, plan, stage_callback, views, batch_size, seed, cache)
    finally:
      cache.close()
    continue_logs(callbacks)
  if epochs > max(initial_epoch, head_end):
    history = model.fit(x, validation_data=validation_data, epochs=epochs,
                        initial_epoch=max(initial_epoch, head_end),
                        callbacks=callbacks, verbose=verbose)
  return history


def _fit_head_on_features(model, x, validation_data, head_end, callbacks,
                          verbose, initial_epoch, plan, stage_callback, views,
                          batch_size, seed, cache):
  started = time.perf_counter()  # Caching counts in stage head's seconds.
  extract = make_feature_extractor(model, plan.jit_compile)
  progbar = _progress_bar(_count_batches(x, views, validation_data), verbose)
  logging.info("Stage head: computing backbone features once: %d view(s) "
               "of the training images, and the validation images.", views)
  val = (cache.store("val", extract, validation_data, progbar)
         if validation_data is not None else None)
  train_views = [cache.store(f"train-view{v}", extract, x, progbar)
                 for v in range(views)]
  summary = cache.summary(train_views, val, time.perf_counter() - started)
  logging.info(
      "Feature cache: %d training images x %d view(s) and %d validation "
      "images in %.1f s (%.0f images/s); %.1f MB in memory, %.1f MB on disk.",
      summary["train_examples"], views, summary["val_examples"],
      summary["seconds"], summary["images_per_second"], summary["memory_mb"],
      summary["disk_mb"])
  with model.distribute_strategy.scope():
    head = build_head_model(model)
    stages.compile_model(head, plan.head_learning_rate, plan.label_smoothing,
                         plan.jit_compile)
  stage_callback.start_stage_early(stages.HEAD, started,
                                   input="cached_features",
                                   feature_cache=summary)
  train, steps = training_dataset(train_views, initial_epoch, batch_size, seed)
  return head.fit(
      train, steps_per_epoch=steps, epochs=head_end,
      initial_epoch=initial_epoch,
      validation_data=val.dataset().batch(batch_size) if val else None,
      callbacks=callbacks, verbose=verbose)


def make_feature_extractor(model: keras.Model, jit_compile: bool = False
                           ) -> Callable[[tf.Tensor], tf.Tensor]:
  """uint8 images [B, S, S, 3] -> pooled backbone features [B, D].

  The backbone runs in inference mode, as in stage head. One trace serves
  every batch size (the last batch is usually smaller): a second trace of
  ResNet50 would cost seconds.
  """
  extractor = keras.Model(model.inputs, model.get_layer(FEATURES_NAME).output)
  spec = tf.TensorSpec([None, *model.input_shape[1:]], model.inputs[0].dtype)
  return tf.function(lambda images: extractor(images, training=False),
                     input_signature=[spec], jit_compile=jit_compile)


def build_head_model(model: keras.Model) -> keras.Model:
  """Features [B, D] -> probabilities, through `model`'s own head layers.

  The layers after the pooling layer are called again on a new input, not
  copied: their weights are shared with `model`, so whatever this head
  learns is in `model` when stage finetune starts.
  """
  names = [layer.name for layer in model.layers]
  pool = model.layers[names.index(FEATURES_NAME)]
  inputs = keras.Input(pool.output.shape[1:], dtype=pool.output.dtype,
                       name="features")
  outputs = inputs
  for layer in model.layers[names.index(FEATURES_NAME) + 1:]:
    outputs = layer(outputs)
  return keras.Model(inputs, outputs, name="head_on_features")


def training_dataset(views: List["CachedView"], first_epoch: int,
                     batch_size: int, seed: int):
  """Endless batches in which epoch e (from `first_epoch`) is view e mod K.

  Returns:
    (dataset, steps per epoch). Each view yields exactly `steps` batches
    per pass, so with `steps_per_epoch=steps` every epoch is one whole view,
    reshuffled each time it comes round.
  """
  batched = []
  for index, view in enumerate(views):
    buffer = view.count if view.path is None else min(view.count,
                                                      DISK_SHUFFLE_BUFFER)
    batched.append(view.dataset().shuffle(
        buffer, seed=seed + index, reshuffle_each_iteration=True).batch(
            batch_size))
  order = [(first_epoch + i) % len(views) for i in range(len(views))]
  dataset = batched[order[0]]
  for index in order[1:]:
    dataset = dataset.concatenate(batched[index])
  steps = math.ceil(views[0].count / batch_size)
  return dataset.repeat().prefetch(tf.data.AUTOTUNE), steps


def continue_logs(callbacks: Sequence) -> None:
  """Lets logging callbacks continue their files in the next `fit`.

  A CSVLogger made with append=False truncates its file in every
  `on_train_begin`: without this, stage finetune's fit would erase the
  epochs of stage head.
  """
  for callback in callbacks:
    if isinstance(callback, keras.callbacks.CSVLogger):
      callback.append = True


class CachedView:
  """The cached (features, labels) of one pass over a split."""

  def __init__(self, name: str):
    self.name = name
    self.count = 0
    self.batches = []  # [(features, labels)] while in memory.
    self.arrays = None  # (features, labels) once finished in memory.
    self.path: Optional[str] = None  # The TFRecord file once on disk.
    self.writer = None
    self.specs = None  # (dtype, shape[1:]) of features and of labels.

  def dataset(self) -> tf.data.Dataset:
    """Unbatched (features, labels) examples, in the order computed."""
    if self.path is None:
      return tf.data.Dataset.from_tensor_slices(self.arrays)
    # With a known length Keras does not warn "input ran out of data" after
    # each validation pass.
    return tf.data.TFRecordDataset(self.path).map(
        functools.partial(_parse_batch, specs=self.specs)).unbatch().apply(
            tf.data.experimental.assert_cardinality(self.count))


class FeatureCache:
  """Cached features of several views: memory up to a budget, then disk."""

  def __init__(self, folder: str, budget_bytes: float):
    self.folder = folder
    self.budget = budget_bytes
    self.memory_bytes = 0
    self.disk_bytes = 0

  def store(self, name: str, extract, dataset: tf.data.Dataset,
            progbar: keras.utils.Progbar) -> CachedView:
    """One pass over `dataset`, its images replaced by their features."""
    view = CachedView(name)
    for images, labels in dataset:
      self._append(view, extract(images).numpy(), labels.numpy())
      progbar.add(1)
    if view.writer is not None:
      view.writer.close()
    elif view.batches:
      view.arrays = tuple(np.concatenate(part) for part in zip(*view.batches))
      view.batches = []
    return view

  def _append(self, view: CachedView, features, labels) -> None:
    size = features.nbytes + labels.nbytes
    view.specs = view.specs or ((features.dtype, features.shape[1:]),
                                (labels.dtype, labels.shape[1:]))
    view.count += len(features)
    if view.writer is None and self.memory_bytes + size > self.budget:
      self._spill(view)
    if view.writer is not None:
      view.writer.write(_serialize_batch(features, labels))
      self.disk_bytes += size
    else:
      view.batches.append((features, labels))
      self.memory_bytes += size

  def _spill(self, view: CachedView) -> None:
    """Moves a view to disk: it goes there whole, from now on."""
    os.makedirs(self.folder, exist_ok=True)
    view.path = os.path.join(self.folder, f"{view.name}.tfrecord")
    view.writer = tf.io.TFRecordWriter(view.path)
    for features, labels in view.batches:
      view.writer.write(_serialize_batch(features, labels))
      size = features.nbytes + labels.nbytes
      self.memory_bytes -= size
      self.disk_bytes += size
    view.batches = []

  def summary(self, train_views, val, seconds: float) -> dict:
    """For the report: what was cached where, and how fast."""
    train = train_views[0].count
    val_count = val.count if val else 0
    images = train * len(train_views) + val_count
    return {"views": len(train_views), "train_examples": train,
            "val_examples": val_count, "seconds": seconds,
            "images_per_second": images / seconds if seconds > 0 else None,
            "memory_mb": self.memory_bytes / (1 << 20),
            "disk_mb": self.disk_bytes / (1 << 20)}

  def close(self) -> None:
    """Deletes the on-disk part, if any."""
    shutil.rmtree(self.folder, ignore_errors=True)


def _serialize_batch(features: np.ndarray, labels: np.ndarray) -> bytes:
  def as_bytes(array):
    return tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[tf.io.serialize_tensor(array).numpy()]))
  return tf.train.Example(features=tf.train.Features(feature={
      "features": as_bytes(features), "labels": as_bytes(labels)})
                         ).SerializeToString()


def _parse_batch(record, specs):
  parsed = tf.io.parse_single_example(
      record, {key: tf.io.FixedLenFeature([], tf.string)
               for key in ("features", "labels")})
  tensors = []
  for key, (dtype, shape) in zip(("features", "labels"), specs):
    tensor = tf.io.parse_tensor(parsed[key], tf.as_dtype(dtype))
    tensor.set_shape([None, *shape])
    tensors.append(tensor)
  return tuple(tensors)


def _count_batches(x, views: int, validation_data) -> Optional[int]:
  """Batches the cache is computed from; None when a dataset cannot tell."""
  counts = [int(x.cardinality())] * views
  if validation_data is not None:
    counts.append(int(validation_data.cardinality()))
  return sum(counts) if min(counts) >= 0 else None


def _progress_bar(batches: Optional[int], verbose) -> keras.utils.Progbar:
  """A Keras progress bar; in a log file (no terminal) a line every 10 s."""
  interactive = hasattr(sys.stdout, "isatty") and sys.stdout.isatty()
  return keras.utils.Progbar(batches, verbose=0 if verbose == 0 else 1,
                             interval=0.05 if interactive else 10.0,
                             unit_name="batch")

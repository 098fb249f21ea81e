"""Stage head on cached backbone features (`--cache_features`, the default).

Design notes: ARCHITECTURE.md, "Module notes", `features.py`.
"""

import dataclasses
import functools
import math
import os
import sys
import time
from typing import Callable, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_finetune import distribute, files, probe, stages
from tf_finetune.model import CLASSIFIER_NAME, FEATURES_NAME

CACHE_DIR = "feature_cache"
# Shuffle buffer (examples) of a view cached on disk: bounded, because the
# view is on disk for want of memory.
DISK_SHUFFLE_BUFFER = 10_000


@dataclasses.dataclass(frozen=True)
class CacheSettings:
  """How stage head's features are cached.

  Attributes:
    views: views per training image (K); 1 is the un-augmented images.
    batch_size: batch size of the head's training on features.
    memory_mb: cache held in memory up to this size; beyond, on disk.
    folder: for the on-disk part; removed afterwards.
    seed: shuffles the cached features.
    probe: train the head as a linear probe (probe.py): standardised
      features, L2 picked on validation, no dropout.
  """
  views: int
  batch_size: int
  memory_mb: float
  folder: str
  seed: int = 0
  probe: bool = False

  @classmethod
  def from_config(cls, config) -> "CacheSettings":
    return cls(config.feature_views, config.batch_size, config.cache_memory_mb,
               os.path.join(config.workdir, CACHE_DIR), config.seed,
               config.probe_head)


class CachedHeadStage:
  """Fits stage head's epochs on cached features, segment by segment.

  The features are computed at the first `fit` (a run resumed past stage
  head computes none); use as a context manager, whose exit deletes the
  on-disk part of the cache.

  Args:
    model: from `model.build_model`, in stage head (`stages.apply_stage`).
    plan: the stage plan.
    stage_callback: the run's TwoStageCallback; the caching time is counted
      in stage head's seconds.
    settings: views, batch size, memory budget, folder, seed.
    train: batches of (uint8 images, one-hot labels[, per-example weights
      from weighting.py]); if it augments, each pass over it is a new view
      (K >= 2).
    train_unaugmented: the same images not augmented (the view when K = 1);
      None: `train` is used instead.
    validation: batches like `train`, not augmented, or None.
    verbose: Keras verbosity (0: no progress bar while caching).
  """

  def __init__(self, model: keras.Model, plan: stages.StagePlan,
               stage_callback: stages.TwoStageCallback,
               settings: CacheSettings, train: tf.data.Dataset,
               train_unaugmented: Optional[tf.data.Dataset],
               validation: Optional[tf.data.Dataset], verbose=2):
    self.model = model
    self.plan = plan
    self.stage_callback = stage_callback
    self.settings = settings
    self.source = (train_unaugmented if settings.views == 1
                   and train_unaugmented is not None else train)
    self.validation = validation
    self.verbose = verbose
    self.cache = FeatureCache(settings.folder, settings.memory_mb * (1 << 20))
    self.head: Optional[keras.Model] = None
    self.views: List[CachedView] = []
    self.val: Optional[CachedView] = None

  def __enter__(self) -> "CachedHeadStage":
    return self

  def __exit__(self, *exc) -> bool:
    self.cache.close()
    return False

  def fit(self, initial_epoch: int, epochs: int, skip_batches: int,
          callbacks: Sequence[keras.callbacks.Callback]):
    """Like `model.fit(train.skip(skip_batches), initial_epoch=...,
    epochs=...)` in stage head, on cached features; returns the History.
    The callbacks see `model`, not the head model that is fit.

    A fit that skips batches (finishing an interrupted epoch) must be one
    epoch long, as in `fit_plan.fit_segments`.
    """
    if self.head is None:
      self._compute()
    batch_size = self.settings.batch_size
    if skip_batches:
      if epochs != initial_epoch + 1:
        raise ValueError("An epoch that skips batches is fitted alone.")
      index = initial_epoch % len(self.views)
      # Seeded as in `training_dataset`: the same order as the interrupted
      # epoch had, when it was its view's first pass.
      train, steps = shuffled_batches(
          self.views[index], batch_size, self.settings.seed + index
      ).skip(skip_batches), None
    else:
      train, steps = training_dataset(self.views, initial_epoch, batch_size,
                                      self.settings.seed)
    # The callbacks see the full model, as in stage finetune: the head model
    # shares its layers and optimizer, so weights, learning rate and
    # checkpoints read the same through either, but a callback reading the
    # backbone, or saving the model, needs the full one.
    replicas = self.model.distribute_strategy.num_replicas_in_sync
    validation = None if self.val is None else distribute.pad_batches(
        self.val.dataset().batch(batch_size), replicas, self.val.count,
        batch_size)
    history = keras.callbacks.History()
    self.head.history = history  # What `fit` returns; History sets `model`'s.
    callback_list = keras.callbacks.CallbackList(
        [*callbacks, history], add_progbar=self.verbose != 0,
        model=self.model, verbose=self.verbose, epochs=epochs, steps=steps)
    # shuffle=False: the cached views are shuffled in the dataset; Keras
    # ignores the default shuffle=True on a tf.data.Dataset but warns.
    self.head.fit(
        distribute.pad_batches(train, replicas), steps_per_epoch=steps,
        epochs=epochs, initial_epoch=initial_epoch,
        validation_data=validation, callbacks=callback_list,
        verbose=self.verbose, shuffle=False)
    return history

  def _compute(self) -> None:
    """Runs the backbone over the views and the validation images once."""
    started = time.perf_counter()  # Caching counts in stage head's seconds.
    views = self.settings.views
    extract = make_feature_extractor(self.model, self.plan.jit_compile)
    progbar = _progress_bar(_count_batches(self.source, views,
                                           self.validation), self.verbose)
    logging.info("Stage head: computing backbone features once: %d view(s) "
                 "of the training images, and the validation images.", views)
    if self.validation is not None:
      self.val = self.cache.store("val", extract, self.validation, progbar)
    self.views = [self.cache.store(f"train-view{v}", extract, self.source,
                                   progbar) for v in range(views)]
    summary = self.cache.summary(self.views, self.val,
                                 time.perf_counter() - started)
    logging.info(
        "Feature cache: %d training images x %d view(s) and %d validation "
        "images in %.1f s (%.0f images/s); %.1f MB in memory, %.1f MB on "
        "disk.", summary["train_examples"], views, summary["val_examples"],
        summary["seconds"], summary["images_per_second"] or 0,
        summary["memory_mb"], summary["disk_mb"])
    fields = {"probe": self._set_up_probe()} if self.settings.probe else {}
    with self.model.distribute_strategy.scope():
      self.head = build_head_model(
          self.model, dropout=not self.settings.probe,
          l2=fields["probe"]["chosen"]["l2"] if fields else 0.0)
      compile_head_model(self.head, self.model, self.plan.jit_compile)
    self.stage_callback.start_stage_early(
        stages.HEAD, started, input="cached_features", feature_cache=summary,
        **fields)

  def _set_up_probe(self) -> dict:
    """Standardises the features and picks the head's L2 on validation.

    A run resumed within stage head finds both in its checkpoint (the
    statistics are the model's weights, the choice is in the stage record)
    and computes neither again.

    Returns:
      The stage record's "probe" field.
    """
    resumed = next((r.probe for r in self.stage_callback.records
                    if r.name == stages.HEAD), None)
    if resumed is not None:
      return resumed
    mean, scale = probe.feature_moments([v.dataset() for v in self.views])
    probe.set_standardization(self.model, mean, scale)
    train, steps = training_dataset(self.views, 0, self.settings.batch_size,
                                    self.settings.seed)
    validation = (None if self.val is None
                  else self.val.dataset().batch(self.settings.batch_size))
    points = probe.fit_grid(
        train, steps, self.plan.head_epochs, validation,
        self.model.output_shape[-1], self.views[0].count, mean, scale,
        self.plan.head_learning_rate, self.plan.label_smoothing,
        self.settings.seed)
    chosen = probe.choose(points)
    probe.log_choice(points, chosen)
    return probe.describe(points, chosen)


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


class HeadOnFeatures(keras.Model):
  """A functional head model whose training loss adds l2 * ||kernel||^2 of
  the classifier; validation losses stay the data loss alone, comparable
  with stage finetune's (a Keras regularizer would add it to both).

  Args:
    inputs, outputs: of the functional model.
    l2: the factor of the L2 term; 0: none.
  """

  def __init__(self, inputs, outputs, l2: float = 0.0, **kwargs):
    super().__init__(inputs, outputs, **kwargs)
    self.l2 = l2

  def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                   training=True):
    loss = super().compute_loss(x, y, y_pred, sample_weight,
                                training=training)
    if not training or not self.l2:
      return loss
    kernel = self.get_layer(CLASSIFIER_NAME).kernel
    # Keras scales each replica's data loss by 1 / replicas before the
    # gradients are summed over replicas; the penalty must be too.
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss + self.l2 * keras.ops.sum(keras.ops.square(kernel)) / replicas


def build_head_model(model: keras.Model, dropout: bool = True,
                     l2: float = 0.0) -> keras.Model:
  """Features [B, D] -> probabilities, through `model`'s own head layers.

  The layers after the pooling layer are called again on a new input, not
  copied: their weights are shared with `model`, so whatever this head
  learns is in `model` when stage finetune starts. Without `dropout` the
  Dropout layer is left out (a linear probe regularises by L2 alone); `l2`
  adds an L2 term on the classifier's kernel to the training loss.
  """
  names = [layer.name for layer in model.layers]
  pool = model.layers[names.index(FEATURES_NAME)]
  inputs = keras.Input(pool.output.shape[1:], dtype=pool.output.dtype,
                       name="features")
  outputs = inputs
  for layer in model.layers[names.index(FEATURES_NAME) + 1:]:
    if dropout or not isinstance(layer, keras.layers.Dropout):
      outputs = layer(outputs)
  return HeadOnFeatures(inputs, outputs, l2=l2, name="head_on_features")


def compile_head_model(head: keras.Model, model: keras.Model,
                       jit_compile: bool = False) -> None:
  """Compiles `head` with `model`'s own optimizer and loss.

  The optimizer was built by `stages.apply_stage` on `model`'s trainable
  variables in stage head, which are exactly `head`'s: sharing it keeps the
  Adam state in `model`, where checkpoints save it (and where a resumed run
  loads it).
  """
  head.compile(optimizer=model.optimizer, loss=model.loss,
               weighted_metrics=[stages.accuracy_metric()],
               jit_compile=jit_compile)


def shuffled_batches(view: "CachedView", batch_size: int, seed: int
                     ) -> tf.data.Dataset:
  """The view's examples, reshuffled on every pass, in batches."""
  buffer = view.count if view.path is None else min(view.count,
                                                    DISK_SHUFFLE_BUFFER)
  return view.dataset().shuffle(buffer, seed=seed,
                                reshuffle_each_iteration=True).batch(batch_size)


def training_dataset(views: List["CachedView"], first_epoch: int,
                     batch_size: int, seed: int):
  """Endless batches in which epoch e (from `first_epoch`) is view e mod K.

  Returns:
    (dataset, steps per epoch). Each view yields exactly `steps` batches
    per pass, so with `steps_per_epoch=steps` every epoch is one whole view,
    reshuffled each time it comes round.
  """
  batched = [shuffled_batches(view, batch_size, seed + index)
             for index, view in enumerate(views)]
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
  """The cached (features, labels[, weights]) of one pass over a split.

  Per-example weights (class weighting, weighting.py) are kept next to
  their features, in memory and on disk, so the head trains on them.
  """

  def __init__(self, name: str):
    self.name = name
    self.count = 0
    self.batches = []  # [(features, labels[, weights])] while in memory.
    self.arrays = None  # (features, labels[, weights]) once in memory.
    self.path: Optional[str] = None  # The TFRecord file once on disk.
    self.writer = None
    self.specs = None  # (dtype, shape[1:]) of each array.

  def dataset(self) -> tf.data.Dataset:
    """Unbatched (features, labels[, weights]) examples, in the order
    computed."""
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
    for images, *rest in dataset:  # rest: labels[, weights]
      self._append(view, (extract(images).numpy(),
                          *(tensor.numpy() for tensor in rest)))
      progbar.add(1)
    if view.writer is not None:
      view.writer.close()
    elif view.batches:
      view.arrays = tuple(np.concatenate(part) for part in zip(*view.batches))
      view.batches = []
    return view

  def _append(self, view: CachedView, arrays: tuple) -> None:
    size = sum(array.nbytes for array in arrays)
    view.specs = view.specs or tuple((array.dtype, array.shape[1:])
                                     for array in arrays)
    view.count += len(arrays[0])
    if view.writer is None and self.memory_bytes + size > self.budget:
      self._spill(view)
    if view.writer is not None:
      view.writer.write(_serialize_batch(arrays))
      self.disk_bytes += size
    else:
      view.batches.append(arrays)
      self.memory_bytes += size

  def _spill(self, view: CachedView) -> None:
    """Moves a view to disk: it goes there whole, from now on."""
    files.makedirs(self.folder)
    view.path = os.path.join(self.folder, f"{view.name}.tfrecord")
    view.writer = tf.io.TFRecordWriter(view.path)
    for arrays in view.batches:
      view.writer.write(_serialize_batch(arrays))
      size = sum(array.nbytes for array in arrays)
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
    files.remove_tree(self.folder)


# The record keys of a cached batch's arrays, in order.
_KEYS = ("features", "labels", "weights")


def _serialize_batch(arrays: tuple) -> bytes:
  def as_bytes(array):
    return tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[tf.io.serialize_tensor(array).numpy()]))
  return tf.train.Example(features=tf.train.Features(feature={
      key: as_bytes(array) for key, array in zip(_KEYS, arrays)})
                         ).SerializeToString()


def _parse_batch(record, specs):
  keys = _KEYS[:len(specs)]
  parsed = tf.io.parse_single_example(
      record, {key: tf.io.FixedLenFeature([], tf.string) for key in keys})
  tensors = []
  for key, (dtype, shape) in zip(keys, specs):
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

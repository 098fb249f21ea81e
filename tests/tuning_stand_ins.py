"""Stand-ins for the trials of tests/test_tuning.py, run in child processes
(test_tuning.TRIAL_COMMAND): a tiny model in place of `model.build_model`,
and the faults the environment asks for. Imports no module that imports
tf_finetune.train, so that the child's train sees the swapped builder."""

import os
import re

import keras
import numpy as np
import tensorflow as tf

from tf_finetune import config as config_lib
from tf_finetune import model as model_lib


def tiny_build(num_classes, image_size, weights, dropout, seed):
  """`model.build_model`'s interface and layer names, 300 parameters."""
  del weights
  print(f"tiny_build: {tf.distribute.get_strategy().num_replicas_in_sync} "
        f"replica(s), seed {seed}", flush=True)
  images = keras.Input((image_size, image_size, 3))
  features = keras.layers.Conv2D(
      4, 3, strides=4, name="conv5_block3_1_conv",
      kernel_initializer=keras.initializers.GlorotUniform(seed))(images)
  backbone = keras.Model(images, features, name=model_lib.BACKBONE_NAME)
  inputs = keras.Input((image_size, image_size, 3), dtype="uint8")
  x = backbone(model_lib.ImageNetPreprocess()(inputs))
  x = keras.layers.GlobalAveragePooling2D(name=model_lib.FEATURES_NAME)(x)
  x = keras.layers.Normalization(name=model_lib.STANDARDIZE_NAME)(x)
  x = keras.layers.Dropout(dropout, seed=seed)(x)
  outputs = keras.layers.Dense(num_classes, activation="softmax",
                               name=model_lib.CLASSIFIER_NAME)(x)
  return keras.Model(inputs, outputs)


def crashing_build(*args):
  """A `build_fn` whose trial fails."""
  raise RuntimeError("out of memory, say")


def user_error_build(*args):
  """A `build_fn` that meets bad input, as a missing weights file."""
  raise config_lib.UserError("--weights='x.weights.h5': no such file.")


def _trial_of(argv):
  """The trial id of a trial process's command line."""
  found = re.search(r"trials/(\d+)/", " ".join(argv))
  return found.group(1) if found else None


def _listed(name, argv):
  return _trial_of(argv) in os.environ.get(name, "").split(",")


def child_build(argv):
  """The builder a trial process uses (see TRIAL_COMMAND)."""
  if _listed("TEST_FAIL_TRIALS", argv):
    return crashing_build
  return globals()[os.environ.get("TEST_BUILD", "tiny_build")]


class NanInFinetune(keras.callbacks.Callback):
  """Makes the classifier's weights NaN as stage finetune begins."""

  def __init__(self, head_epochs):
    super().__init__()
    self.head_epochs = head_epochs

  def on_epoch_begin(self, epoch, logs=None):
    if epoch == self.head_epochs:
      kernel = self.model.get_layer(model_lib.CLASSIFIER_NAME).kernel
      kernel.assign(np.full(kernel.shape, np.nan, "float32"))


def install_faults(train, argv):
  """TEST_NAN_TRIALS: those trials diverge in stage finetune."""
  if not _listed("TEST_NAN_TRIALS", argv):
    return
  run_training = train.run_training
  train.run_training = lambda config, extra=(): run_training(
      config, [*extra, NanInFinetune(config.head_epochs)])

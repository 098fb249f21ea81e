"""The model: uint8 images -> preprocessing -> ResNet50 -> pool -> dropout -> Dense.

Preprocessing lives inside the model, so the Keras file and the SavedModel
take raw pixels and nothing outside the model has to repeat it. It is made
of Keras' built-in layers only, so `keras.saving.load_model` reads
`model.keras` in any Python with Keras, without this package.
"""

from typing import List

import keras
import numpy as np

from tf_finetune import files
from tf_finetune.config import UserError, first_line

BACKBONE_NAME = "backbone"
# The pooled backbone output: the head's input, and what features.py caches.
FEATURES_NAME = "pool"
# Standardises the pooled features; the identity until stage head sets it
# (probe.py).
STANDARDIZE_NAME = "standardize"
CLASSIFIER_NAME = "classifier"
# The fixed map of caffe-mode preprocessing (below); it never trains.
PREPROCESS_NAME = "preprocess"
# ResNet50's ImageNet preprocessing ("caffe" mode of
# keras.applications.imagenet_utils.preprocess_input): RGB -> BGR, then the
# ImageNet mean of each BGR channel subtracted; no scaling.
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess_images(images):
  """Applies ResNet50's caffe-mode preprocessing to uint8 RGB images.

  A cast (`Rescaling(1.0)`) and one fixed linear map, a non-trainable 1x1
  `Conv2D` whose kernel swaps R and B and whose bias is minus the mean:
  built-in layers, so a saved model needs no custom class to load. Both
  layers compute in float32 whatever the global dtype policy, so the result
  equals `preprocess_input(mode="caffe")` exactly and is rounded once, where
  the backbone casts it to its compute dtype under mixed precision.

  Args:
    images: symbolic uint8 tensor [N, H, W, 3], RGB.

  Returns:
    Float32 tensor [N, H, W, 3]: BGR minus the ImageNet mean.
  """
  x = keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(images)
  caffe = keras.layers.Conv2D(3, 1, trainable=False, dtype="float32",
                              name=PREPROCESS_NAME)
  x = caffe(x)
  # kernel[0, 0, input channel, output channel]: output c is input 2 - c.
  rgb_to_bgr = np.eye(3, dtype="float32")[::-1].reshape(1, 1, 3, 3)
  caffe.set_weights([rgb_to_bgr, -np.array(IMAGENET_MEAN_BGR, "float32")])
  return x


@keras.saving.register_keras_serializable(package="tf_finetune")
class ImageNetPreprocess(keras.layers.Layer):
  """Casts uint8 pixels to float and applies `keras.applications` preprocessing.

  The preprocessing of models saved by earlier versions of this package
  (`build_model` now uses `preprocess_images`). Kept registered so that
  their `model.keras` files still load through the package, e.g. with
  `saved_models.load_model_safely`.
  """

  def __init__(self, mode: str = "caffe", **kwargs):
    super().__init__(**kwargs)
    self.mode = mode

  def call(self, images):
    images = keras.ops.cast(images, self.compute_dtype)
    return keras.applications.imagenet_utils.preprocess_input(
        images, mode=self.mode)

  def get_config(self):
    return {**super().get_config(), "mode": self.mode}


def build_model(num_classes: int, image_size: int, weights: str = "imagenet",
                dropout: float = 0.2, seed: int = 42) -> keras.Model:
  """Builds the classifier; the backbone is the nested model named 'backbone'.

  Args:
    num_classes: outputs of the softmax head.
    image_size: square input side in pixels.
    weights: 'imagenet', 'none', or a path to a `.weights.h5` file saved from
      `keras.applications.ResNet50(include_top=False)`.
    dropout: dropout rate before the head.
    seed: seeds the head's initialiser and dropout.

  Returns:
    A functional model taking uint8 [None, S, S, 3] and returning float32
    probabilities [None, num_classes]. The preprocessing never trains; the
    other layers are trainable, and the stage callback decides what trains.
  """
  shape = (image_size, image_size, 3)
  inputs = keras.Input(shape, dtype="uint8", name="images")
  x = preprocess_images(inputs)
  x = build_backbone(shape, weights)(x)
  x = keras.layers.GlobalAveragePooling2D(name=FEATURES_NAME)(x)
  # A built-in layer, so that model.keras loads without this package; its
  # mean and variance are weights (saved with the model), set from the
  # training features when stage head starts.
  x = keras.layers.Normalization(name=STANDARDIZE_NAME, dtype="float32")(x)
  x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
  # float32 output keeps the softmax and the loss stable under mixed precision.
  outputs = keras.layers.Dense(
      num_classes, activation="softmax", dtype="float32", name=CLASSIFIER_NAME,
      kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(x)
  return keras.Model(inputs, outputs, name="classifier_model")


def build_backbone(input_shape, weights: str) -> keras.Model:
  """ResNet50 without its top, with weights from ImageNet, nowhere, or a file."""
  if weights == "imagenet":
    return _download_imagenet_backbone(input_shape)
  backbone = keras.applications.ResNet50(
      include_top=False, weights=None, input_shape=input_shape,
      name=BACKBONE_NAME)
  if weights != "none":
    load_backbone_weights(backbone, weights)
  return backbone


def _download_imagenet_backbone(input_shape) -> keras.Model:
  try:
    return keras.applications.ResNet50(
        include_top=False, weights="imagenet", input_shape=input_shape,
        name=BACKBONE_NAME)
  except Exception as e:  # urllib, OSError, HTTP errors: all mean "no weights".
    raise UserError(
        "--weights=imagenet: could not download the ImageNet weights of "
        f"ResNet50 ({type(e).__name__}: {first_line(e)}). Without internet "
        "access, pass --weights=PATH to a local .weights.h5 file of "
        "ResNet50(include_top=False), or --weights=none.") from e


def load_backbone_weights(backbone: keras.Model, path: str) -> None:
  """Loads a `.weights.h5` file into `backbone`, or raises UserError."""
  if not path.endswith(".weights.h5"):
    raise UserError(
        f"--weights={path!r}: expected 'imagenet', 'none' or a path ending in "
        ".weights.h5 (saved by ResNet50(include_top=False).save_weights).")
  if not files.isfile(path):
    raise UserError(f"--weights={path!r}: no such file.")
  try:
    backbone.load_weights(path)
  except Exception as e:  # Keras raises ValueError/KeyError/OSError by case.
    raise UserError(
        f"--weights={path!r}: this file does not hold the weights of "
        f"ResNet50(include_top=False) ({type(e).__name__}: "
        f"{first_line(e)}).") from e


def get_backbone(model: keras.Model) -> keras.Model:
  """The nested ResNet50 of a model made by `build_model`."""
  return model.get_layer(BACKBONE_NAME)


def seed_state_variables(model: keras.Model) -> List:
  """The model's variables that its weights file leaves out: the states of
  its random seed generators (Dropout's), in a fixed order.

  Keras saves `model.weights` only; `model.variables` also holds each
  SeedGenerator's state. Without it a resumed run would draw other dropout
  masks than an uninterrupted one from the first resumed step on.
  """
  saved = {id(v) for v in model.weights}
  return [v for v in model.variables if id(v) not in saved]


def seed_states(model: keras.Model) -> List[List[int]]:
  """The values of `seed_state_variables(model)`, as JSON lists."""
  return [np.asarray(v.numpy()).tolist() for v in seed_state_variables(model)]


def restore_seed_states(model: keras.Model, values: List[List[int]]) -> None:
  """Assigns what `seed_states` returned to the model's seed generators."""
  variables = seed_state_variables(model)
  if len(variables) != len(values):
    raise UserError(
        f"The checkpoint holds {len(values)} random seed states, the model "
        f"has {len(variables)}: it was written by another version of "
        "tf_finetune. Pass --fresh to start over.")
  for variable, value in zip(variables, values):
    variable.assign(np.asarray(value, dtype=variable.dtype))

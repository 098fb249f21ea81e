"""The model's preprocessing: ResNet50's caffe mode from built-in layers."""

import json
import zipfile

import keras
import numpy as np
import pytest

from tf_finetune import model as model_lib
from tf_finetune import saved_models, speed, stages

SIZE = 32


def pixels(count=3, seed=0):
  images = np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3),
                                                dtype=np.uint8)
  images[0, 0, :2] = [[0, 0, 0], [255, 255, 255]]  # Both ends of the range.
  return images


def caffe(images):
  return keras.applications.imagenet_utils.preprocess_input(
      images.astype("float32"), mode="caffe")


def preprocessing_of(model):
  return keras.Model(model.inputs, model.get_layer("preprocess").output)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16",
                                    "mixed_bfloat16"])
def test_preprocessing_equals_keras_caffe_mode_under_every_policy(policy):
  with speed.dtype_policy(policy):
    model = model_lib.build_model(3, SIZE, weights="none")
  images = pixels()
  preprocessed = preprocessing_of(model).predict(images, verbose=0)
  # float32 whatever the policy: the backbone rounds it once, on its input.
  assert preprocessed.dtype == np.float32
  np.testing.assert_allclose(preprocessed, caffe(images), rtol=0, atol=1e-4)
  backbone_dtype = {"float32": "float32", "mixed_float16": "float16",
                    "mixed_bfloat16": "bfloat16"}[policy]
  assert model_lib.get_backbone(model).compute_dtype == backbone_dtype


def test_preprocessing_trains_in_no_stage():
  model = model_lib.build_model(3, SIZE, weights="none")
  fixed = {v.path for v in model.get_layer("preprocess").weights}
  assert fixed == {"preprocess/kernel", "preprocess/bias"}
  plan = stages.StagePlan(1, 1, 1e-3, 1e-4, unfreeze_blocks=16)
  for stage in (stages.HEAD, stages.FINETUNE):
    stages.apply_stage(model, plan, stage)
    trainable = {v.path for v in model.trainable_variables}
    assert "classifier/kernel" in trainable
    assert not fixed & trainable, stage
  assert "conv1_conv/kernel" not in trainable  # The stem, frozen too.
  assert "conv2_block1_1_conv/kernel" in trainable  # All 16 blocks train.


def test_saved_model_config_has_only_keras_layers(tmp_path):
  path = str(tmp_path / "model.keras")
  model_lib.build_model(3, SIZE, weights="none").save(path)
  with zipfile.ZipFile(path) as archive:
    config = json.loads(archive.read("config.json"))
  layers = config["config"]["layers"]
  assert [layer["class_name"] for layer in layers[:3]] == [
      "InputLayer", "Rescaling", "Conv2D"]
  assert all(layer["module"].startswith("keras") for layer in layers)
  assert all(layer.get("registered_name") in (None, layer["class_name"])
             for layer in layers)


def test_model_with_the_earlier_preprocessing_layer_loads_through_the_package(
    tmp_path):
  """model.keras files written before the built-in preprocessing."""
  # The name those files refer to the class by.
  assert keras.saving.get_registered_name(model_lib.ImageNetPreprocess) == (
      "tf_finetune>ImageNetPreprocess")
  inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8", name="images")
  x = model_lib.ImageNetPreprocess(name="preprocess")(inputs)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  outputs = keras.layers.Dense(3, activation="softmax", name="classifier")(x)
  earlier = keras.Model(inputs, outputs)
  path = str(tmp_path / "model.keras")
  earlier.save(path)
  loaded = saved_models.load_model_safely(path)
  assert isinstance(loaded.get_layer("preprocess"),
                    model_lib.ImageNetPreprocess)
  images = pixels()
  np.testing.assert_allclose(loaded.predict(images, verbose=0),
                             earlier.predict(images, verbose=0), rtol=1e-6)
  # Old and new preprocessing are the same function.
  np.testing.assert_allclose(
      preprocessing_of(loaded).predict(images, verbose=0),
      preprocessing_of(model_lib.build_model(3, SIZE, weights="none")).predict(
          images, verbose=0), rtol=0, atol=1e-4)

"""Tests of batch augmentation, eagerly and inside tf.data (as big_vision)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_finetune import augment
from tf_finetune import config as config_lib
from tf_finetune import train
from tf_finetune.config import UserError

NUM_CLASSES = 4
IMAGE_ONLY = [n for n in augment.AUGMENTATIONS if n not in augment.MIXING]


def make_images(batch=8, size=32):
  """Asymmetric images (gradients, a bright corner): every transform shows."""
  yy, xx = np.mgrid[0:size, 0:size]
  base = np.stack([xx * 255 // size, yy * 255 // size,
                   (xx + yy) * 127 // size], -1)
  base[: size // 4, : size // 4] = 255
  images = np.stack([np.roll(base, shift, axis=1) for shift in range(batch)])
  return tf.constant(images.astype(np.uint8))


def make_labels(batch=8):
  return tf.constant(np.arange(batch) % NUM_CLASSES, tf.int32)


def augment_eagerly(names, seed, images, labels=None):
  """The second of two batches, augmented eagerly."""
  augmenter = augment.build_augmenter(names, seed)
  if labels is None:
    augment.augment_batch(augmenter, images)
    return augment.augment_batch(augmenter, images)
  augment.augment_labelled_batch(augmenter, images, labels, NUM_CLASSES)
  return augment.augment_labelled_batch(augmenter, images, labels, NUM_CLASSES)


def augment_in_tf_data(names, seed, images, labels):
  """Through `augment_dataset`, the pipeline's two maps (draw, then apply in
  parallel), over two batches: returns the second."""
  augmenter = augment.build_augmenter(names, seed)
  dataset = augment.augment_dataset(
      augmenter, tf.data.Dataset.from_tensors((images, labels)).repeat(2),
      NUM_CLASSES)
  _, result = list(dataset)
  assert dataset.element_spec[0].shape == images.shape
  assert dataset.element_spec[0].dtype == tf.uint8
  return result


@pytest.mark.parametrize("name", IMAGE_ONLY)
def test_each_augmentation_changes_images_and_keeps_uint8_shape(name):
  images, labels = make_images(), make_labels()
  eager = augment_eagerly([name], 3, images)
  in_pipeline, same_labels = augment_in_tf_data([name], 3, images, labels)
  for result in (eager, in_pipeline):
    assert result.dtype == tf.uint8 and result.shape == images.shape
    assert not np.array_equal(result.numpy(), images.numpy())
  # Eager and tf.data give the same pixels for the same seed.
  np.testing.assert_array_equal(eager.numpy(), in_pipeline.numpy())
  np.testing.assert_array_equal(same_labels.numpy(), labels.numpy())


@pytest.mark.parametrize("names", [("mixup",), ("cutmix",),
                                   ("flip", "mixup", "cutmix")])
def test_label_mixing_gives_valid_images_and_soft_labels(names):
  images, labels = make_images(), make_labels()
  eager = augment_eagerly(names, 5, images, labels)
  in_pipeline = augment_in_tf_data(names, 5, images, labels)
  for mixed_images, mixed in (eager, in_pipeline):
    assert mixed_images.dtype == tf.uint8
    assert mixed_images.shape == images.shape
    assert mixed.dtype == tf.float32 and mixed.shape == (8, NUM_CLASSES)
    mixed = mixed.numpy()
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, atol=1e-5)
    assert mixed.min() >= 0.0 and mixed.max() <= 1.0 + 1e-6
    # Every image keeps part of its own label, and some take another's.
    assert (mixed[np.arange(8), labels.numpy()] > 0).all()
    assert ((mixed > 0).sum(axis=1) > 1).any()
  for a, b in zip(eager, in_pipeline):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_label_mixing_needs_the_labels():
  augmenter = augment.build_augmenter(("mixup",), 0)
  with pytest.raises(ValueError, match="augment_labelled_batch"):
    augment.augment_batch(augmenter, make_images())


def test_mixed_labels_pass_through_to_one_hot_and_train_a_model():
  images, labels = make_images(), make_labels()
  augmenter = augment.build_augmenter(("cutmix",), 1)
  mixed = tf.data.Dataset.from_tensors((images, labels)).map(
      lambda x, y: augment.augment_labelled_batch(augmenter, x, y,
                                                  NUM_CLASSES))
  plain = tf.data.Dataset.from_tensors((images, labels))
  for dataset in (train.to_one_hot(mixed, NUM_CLASSES),
                  train.to_one_hot(plain, NUM_CLASSES)):
    assert dataset.element_spec[1].shape.as_list() == [8, NUM_CLASSES]
  (_, soft), = list(train.to_one_hot(mixed, NUM_CLASSES))
  assert 0 < np.sum((soft.numpy() > 0) & (soft.numpy() < 1))
  keras.utils.set_random_seed(0)
  inputs = keras.Input((32, 32, 3), dtype="uint8")
  x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(
      inputs))
  model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES,
                                                 activation="softmax")(x))
  model.compile("adam", "categorical_crossentropy")
  history = model.fit(train.to_one_hot(mixed, NUM_CLASSES), epochs=2,
                      verbose=0, shuffle=False)
  assert np.isfinite(history.history["loss"]).all()


def test_same_seed_same_output_other_seed_other_output():
  images = make_images()
  names = IMAGE_ONLY
  first = augment_eagerly(names, 11, images).numpy()
  np.testing.assert_array_equal(first, augment_eagerly(names, 11,
                                                       images).numpy())
  assert not np.array_equal(first, augment_eagerly(names, 12, images).numpy())


def test_successive_batches_get_new_transforms():
  images = make_images()
  augmenter = augment.build_augmenter(("rotation",), 5)
  first = augment.augment_batch(augmenter, images).numpy()
  second = augment.augment_batch(augmenter, images).numpy()
  assert not np.array_equal(first, second)


def apply_transform(images, **params):
  """affine_transforms with fixed parameters, applied to a batch."""
  batch, height, width = images.shape[:3]
  values = dict(flip=1.0, angle=0.0, zoom=1.0, window_x=1.0, window_y=1.0,
                shift_x=0.0, shift_y=0.0)
  values.update(params)
  transforms = augment.affine_transforms(
      *[tf.fill([batch], float(values[k])) for k in
        ("flip", "angle", "zoom", "window_x", "window_y", "shift_x",
         "shift_y")], height, width)
  return keras.ops.image.affine_transform(
      tf.cast(images, tf.float32), transforms, interpolation="bilinear",
      fill_mode="reflect").numpy()


def test_fused_transform_flips_rotates_and_crops_exactly():
  images = make_images(2, size=9).numpy()
  np.testing.assert_allclose(apply_transform(images), images, atol=1e-4)
  np.testing.assert_allclose(apply_transform(images, flip=-1.0),
                             images[:, :, ::-1], atol=1e-4)
  np.testing.assert_allclose(apply_transform(images, angle=np.pi),
                             images[:, ::-1, ::-1], atol=1e-3)
  # A half-size window in the bottom-right corner (the largest offset that
  # stays inside): output pixel x samples input 4 + x / 2, so every second
  # output pixel is exactly an input pixel of that corner.
  cropped = apply_transform(images, window_x=0.5, window_y=0.5, shift_x=2.0,
                            shift_y=2.0)
  np.testing.assert_allclose(cropped[:, ::2, ::2], images[:, 4:, 4:],
                             atol=1e-3)


def test_fast_randaugment_equals_keras_randaugment():
  images = tf.cast(make_images(), tf.float32)
  for seed in (0, 1):
    fast = augment.FastRandAugment(value_range=(0, 255), seed=seed)
    reference = keras.layers.RandAugment(value_range=(0, 255), seed=seed)
    for _ in range(3):  # Successive batches: different ops each time.
      np.testing.assert_array_equal(fast(images, training=True).numpy(),
                                    reference(images, training=True).numpy())


def test_no_augmentation_is_none_and_passes_images_through():
  assert augment.build_augmenter((), 0) is None
  assert augment.build_augmenter(config_lib.parse_augment("none"), 0) is None
  assert augment.build_augmenter(config_lib.parse_augment(" NONE "), 0) is None
  images, labels = make_images(), make_labels()
  assert augment.augment_batch(None, images) is images
  assert augment.augment_labelled_batch(None, images, labels, 4) == (images,
                                                                      labels)


def test_unknown_name_is_a_user_error_listing_valid_names():
  with pytest.raises(UserError) as raised:
    augment.build_augmenter(("flip", "sparkle"), 0)
  message = str(raised.value)
  assert "--augment" in message and "'sparkle'" in message
  for name in augment.AUGMENTATIONS:
    assert name in message

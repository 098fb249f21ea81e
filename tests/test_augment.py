"""Tests of batch augmentation, eagerly and inside tf.data (as big_vision)."""

import numpy as np
import pytest
import tensorflow as tf

from tf_finetune import augment
from tf_finetune.config import UserError


def make_images(batch=8, size=32):
  """Asymmetric images (gradients, a bright corner): every transform shows."""
  yy, xx = np.mgrid[0:size, 0:size]
  base = np.stack([xx * 255 // size, yy * 255 // size,
                   (xx + yy) * 127 // size], -1)
  base[: size // 4, : size // 4] = 255
  images = np.stack([np.roll(base, shift, axis=1) for shift in range(batch)])
  return tf.constant(images.astype(np.uint8))


def augment_eagerly(names, seed, images):
  return augment.augment_batch(augment.build_augmenter(names, seed), images)


def augment_in_tf_data(names, seed, images):
  augmenter = augment.build_augmenter(names, seed)
  dataset = tf.data.Dataset.from_tensors(images).map(
      lambda batch: augment.augment_batch(augmenter, batch))
  (result,) = list(dataset)
  assert dataset.element_spec.shape == images.shape
  assert dataset.element_spec.dtype == tf.uint8
  return result


@pytest.mark.parametrize("name", sorted(augment.AUGMENTATIONS))
def test_each_augmentation_changes_images_and_keeps_uint8_shape(name):
  images = make_images()
  eager = augment_eagerly([name], 3, images)
  in_pipeline = augment_in_tf_data([name], 3, images)
  for result in (eager, in_pipeline):
    assert result.dtype == tf.uint8 and result.shape == images.shape
    assert not np.array_equal(result.numpy(), images.numpy())
  # Eager and tf.data give the same pixels for the same seed.
  np.testing.assert_array_equal(eager.numpy(), in_pipeline.numpy())


def test_same_seed_same_output_other_seed_other_output():
  images = make_images()
  names = ("flip", "rotation", "zoom", "contrast", "brightness", "crop")
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


def test_no_augmentation_is_none_and_passes_images_through():
  assert augment.build_augmenter((), 0) is None
  assert augment.build_augmenter(("none",), 0) is None
  images = make_images()
  assert augment.augment_batch(None, images) is images


def test_unknown_name_is_a_user_error_listing_valid_names():
  with pytest.raises(UserError) as raised:
    augment.build_augmenter(("flip", "sparkle"), 0)
  message = str(raised.value)
  assert "--augment" in message and "'sparkle'" in message
  for name in augment.AUGMENTATIONS:
    assert name in message

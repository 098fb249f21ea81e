"""Input stage: image sources -> decoded, resized uint8 batches via tf.data."""

import tensorflow as tf


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """Decodes one encoded image (JPEG/PNG/GIF/BMP) to uint8 [S, S, 3].

  The single place where pixels are decoded and resized: the training input
  pipeline and the exported serving graph both call it, so what is served
  equals what was evaluated.
  """
  image = tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8,
                             expand_animations=False)
  return resize_image(image, image_size)


def resize_image(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Resizes a uint8 [H, W, 3] image to uint8 [S, S, 3] (bilinear, antialiased)."""
  image.set_shape([None, None, 3])
  resized = tf.image.resize(image, [image_size, image_size], antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

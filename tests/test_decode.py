"""Tests of decode.py: every kind of image decodes to the right uint8 RGB
pixels, eagerly and inside tf.data; bad bytes raise; the serving graph
decodes exactly as training does."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import image_cases
from tf_finetune import decode
from tf_finetune import export

SIZE = 32
GOOD = image_cases.decodable_cases()
BAD = image_cases.undecodable_cases()


def decode_in_tf_data(function, content):
  dataset = tf.data.Dataset.from_tensors(tf.constant(content)).map(function)
  (result,) = list(dataset)
  return result.numpy()


@pytest.mark.parametrize("name", sorted(GOOD))
def test_every_kind_decodes_to_the_right_rgb_pixels(name):
  content, expected, tolerance = GOOD[name]
  eager = decode.decode_image(tf.constant(content)).numpy()
  assert eager.dtype == np.uint8 and eager.shape == expected.shape
  # Exact for lossless formats (tolerance 0), within the loss for JPEG.
  assert np.abs(eager.astype(int) - expected).mean() <= tolerance
  np.testing.assert_array_equal(
      decode_in_tf_data(decode.decode_image, content), eager)
  resized = decode_in_tf_data(lambda b: decode.decode_and_resize(b, SIZE),
                              content)
  assert resized.dtype == np.uint8 and resized.shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("name", sorted(BAD))
def test_undecodable_bytes_raise_eagerly_and_in_tf_data(name):
  content, _ = BAD[name]
  with pytest.raises(tf.errors.InvalidArgumentError):
    decode.decode_and_resize(tf.constant(content), SIZE)
  with pytest.raises(tf.errors.InvalidArgumentError):
    decode_in_tf_data(lambda b: decode.decode_and_resize(b, SIZE), content)


def test_large_jpeg_is_decoded_at_reduced_scale_close_to_full_decode():
  content = image_cases.encode(image_cases.photo(600, 800), "JPEG",
                               quality=95)
  # The largest DCT scale that keeps the shorter side >= min_size.
  assert decode.decode_image(content, min_size=64).shape == (75, 100, 3)
  assert decode.decode_image(content, min_size=100).shape == (150, 200, 3)
  assert decode.decode_image(content, min_size=600).shape == (600, 800, 3)
  fast = decode.decode_and_resize(content, 64).numpy().astype(int)
  full = decode.resize_image(tf.io.decode_jpeg(content, channels=3),
                             64).numpy().astype(int)
  assert np.abs(fast - full).mean() < 1.5


def test_resize_keeps_flat_colours_and_antialiases_shrinking():
  # Flat colour stays flat whichever way it is resized.
  flat = np.full((50, 70, 3), (10, 120, 250), np.uint8)
  for size in (32, 90):
    np.testing.assert_array_equal(
        decode.resize_image(tf.constant(flat), size).numpy(),
        np.broadcast_to(flat[0, 0], (size, size, 3)))
  # Shrinking noise 4x must average it (antialiasing); sampling only a few
  # input pixels per output pixel would keep much of its variance.
  noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), np.uint8)
  shrunk = decode.resize_image(tf.constant(noise), 32).numpy()
  assert shrunk.std() < 0.3 * noise.std()


def test_sniff_format_names_what_the_bytes_are():
  assert decode.sniff_format(GOOD["cmyk.jpg"][0][:32]) == "JPEG"
  assert decode.sniff_format(GOOD["gray16.png"][0][:32]) == "PNG"
  assert decode.sniff_format(GOOD["animated.gif"][0][:32]) == "GIF"
  assert decode.sniff_format(GOOD["palette4.bmp"][0][:32]) == "BMP"
  assert decode.sniff_format(GOOD["lossless.webp"][0][:32]) == "WebP"
  assert decode.sniff_format(BAD["scan.tiff"][0][:32]) == "TIFF"
  assert decode.sniff_format(b"<html>") == ""


def build_tiny_model():
  keras.utils.set_random_seed(0)
  images = keras.Input((SIZE, SIZE, 3), dtype="uint8")
  x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(images)
  x = keras.layers.Conv2D(4, 3, activation="relu")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(images, keras.layers.Dense(3, activation="softmax")(x))


def test_serving_graph_decodes_every_kind_like_training(tmp_path):
  model = build_tiny_model()
  path = export.export_saved_model(model, ("a", "b", "c"), SIZE,
                                   str(tmp_path))
  serve = tf.saved_model.load(path).signatures["serving_default"]
  contents = [content for content, _, _ in GOOD.values()]
  served = serve(image_bytes=tf.constant(contents))["probabilities"].numpy()
  pixels = np.stack([decode.decode_and_resize(c, SIZE).numpy()
                     for c in contents])
  np.testing.assert_allclose(served, model(pixels).numpy(), atol=1e-5)

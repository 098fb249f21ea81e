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
from tf_finetune.config import DEFAULT_MAX_IMAGE_PIXELS, Config, UserError

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


HEADERS = image_cases.header_cases()
# Just above the default limit: 90.25 megapixels.
HUGE = 9500


@pytest.mark.parametrize("name", sorted({*GOOD, *HEADERS}))
def test_header_dimensions_are_the_decoded_dimensions(name):
  content = HEADERS[name] if name in HEADERS else GOOD[name][0]
  height, width = decode.image_dimensions(tf.constant(content))
  assert (int(height), int(width), 3) == decode.decode_image(content).shape


def decode_with_limit(content, max_pixels, in_tf_data=False):
  """Decodes `content` eagerly (and in tf.data): the pixel limit's message
  (the same in both), "decoded", or "decoder failed"."""
  outcomes = []
  runs = [lambda f: f(tf.constant(content)).numpy()]
  if in_tf_data:
    runs.append(lambda f: decode_in_tf_data(f, content))
  for run in runs:
    try:
      run(lambda b: decode.decode_and_resize(b, SIZE, max_pixels))
      outcomes.append("decoded")
    except tf.errors.InvalidArgumentError as error:
      outcomes.append(decode.too_large_reason(error) or "decoder failed")
  assert len(set(outcomes)) == 1, outcomes
  return outcomes[0]


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_an_image_above_the_limit_is_refused_before_decoding(name):
  huge = image_cases.with_size(HEADERS[name], HUGE + 1, HUGE)
  assert [int(n) for n in decode.image_dimensions(huge)] == [HUGE, HUGE + 1]
  assert decode_with_limit(huge, DEFAULT_MAX_IMAGE_PIXELS) == (
      "image too large to decode: 9501 x 9500 pixels (90.3 megapixels) is "
      "above the limit of 89478485 pixels (89.5 megapixels) set by "
      "--max_image_pixels")
  # Without the limit the decoder runs: it fails on the pixel data, which
  # does not match the header, or (libjpeg) pads the missing rows.
  assert decode.TOO_LARGE not in decode_with_limit(huge, 0)


def test_the_limit_is_width_times_height_and_below_it_nothing_changes():
  content = HEADERS["rgb.png"]  # 41 x 30 = 1230 pixels.
  assert "41 x 30 pixels" in decode_with_limit(content, 1229, in_tf_data=True)
  unlimited = decode.decode_and_resize(content, SIZE, max_pixels=0).numpy()
  for limit in (1230, DEFAULT_MAX_IMAGE_PIXELS):
    np.testing.assert_array_equal(
        decode.decode_and_resize(content, SIZE, max_pixels=limit).numpy(),
        unlimited)


def test_a_gif_frame_larger_than_its_screen_counts():
  # TensorFlow decodes a GIF to its largest frame, whatever the screen says.
  content = image_cases.gif_with_large_frame(screen=10, frame=1500)
  assert decode.decode_image(content, max_pixels=0).shape == (1500, 1500, 3)
  assert [int(n) for n in decode.image_dimensions(content)] == [1500, 1500]
  assert "1500 x 1500 pixels" in decode_with_limit(content, 1500**2 - 1)


def test_the_pixel_limit_setting():
  from PIL import Image
  assert Config(workdir="w").max_image_pixels == Image.MAX_IMAGE_PIXELS
  with pytest.raises(UserError, match="--max_image_pixels=-1: must be >= 0"):
    Config(workdir="w", max_image_pixels=-1).validate()


def test_a_gif_too_fragmented_to_measure_cheaply_is_refused():
  # Finding the frames walks the blocks; encoders write 255-byte data
  # sub-blocks, skipped 64 at a time. One-byte sub-blocks would make the
  # walk cost more than any decode, so past 20,000 steps the GIF is refused.
  still = HEADERS["still.gif"]
  start = 13 + 3 * 2 ** ((still[10] & 7) + 1)  # After the colour table.

  def with_comment(sub_blocks):
    return (still[:start] + b"!\xfe" + b"\x01X" * sub_blocks + b"\0"
            + still[start:])

  assert [int(n) for n in decode.image_dimensions(with_comment(1000))] == [
      30, 41]
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="GIF: more than 20000 blocks"):
    decode.decode_image(with_comment(25000))
  # The file itself decodes: only the check refuses it.
  assert decode.decode_image(with_comment(25000), max_pixels=0).shape == (
      30, 41, 3)

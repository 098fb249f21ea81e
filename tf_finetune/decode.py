"""Decoding: encoded image bytes -> uint8 [H, W, 3], the same way everywhere.

`decode_and_resize` is the one function that turns a file's bytes into the
pixels the model sees: the training pipeline (`data.py`), the up-front check
of folder sources (`folder_source.py`) and the exported serving graph
(`export.py`) all call it, so what is served equals what was trained and
checked. It is made of TensorFlow ops only (no Python in the hot path, and
TF Serving runs it as is).

The format is taken from the content, never from the file name, so a PNG
called `x.jpg` decodes. Handled: JPEG (baseline, progressive, grayscale,
CMYK), PNG (grayscale, palette, RGBA, 16-bit: alpha dropped, 16-bit scaled
to 8), GIF (first frame), BMP (24/32-bit, and 1/2/4/8-bit with a colour
table), WebP (still images).

Two places where `tf.io.decode_image` alone is not enough:

  * Indexed BMPs: TensorFlow's BMP decoder ignores the colour table and
    returns the palette INDICES as a grayscale image (silently wrong colours
    for 8-bit palette BMPs) and rejects 1- and 4-bit ones ("Number of
    channels inherent in the image must be 1, 3 or 4, was 0";
    tensorflow/tensorflow#60603, #13942). `_decode_indexed_bmp` reads the
    colour table itself.
  * Large JPEGs: libjpeg can scale by 1/2, 1/4 or 1/8 while decoding (in
    the DCT domain), which is several times cheaper than decoding a 12 MP
    photo in full and then shrinking it. `_decode_jpeg` uses the largest
    scale that keeps both sides at least the target size; the antialiased
    resize then does the rest.

Truncated files are not "repaired": TensorFlow's JPEG and PNG decoders
reject them, and a JPEG recovered with `try_recover_truncated` has grey
rows where data was missing, which would train the model on damage.
"""

import tensorflow as tf

# Magic numbers, for picking a decoder and for saying why a file failed.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjXL ", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
)
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WebP")
# libjpeg's DCT scaling factors, largest first.
_JPEG_RATIOS = (8, 4, 2, 1)


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """Decodes one encoded image to uint8 [S, S, 3] (see the module docstring).

  Args:
    image_bytes: scalar tf.string, the content of an image file.
    image_size: S, the side of the square output.

  Raises:
    tf.errors.InvalidArgumentError (when run): empty, truncated, corrupt or
      not in a supported format.
  """
  return resize_image(decode_image(image_bytes, min_size=image_size),
                      image_size)


def decode_image(image_bytes: tf.Tensor, min_size: int = 0) -> tf.Tensor:
  """Decodes one encoded image to uint8 [H, W, 3], choosing by content.

  Args:
    image_bytes: scalar tf.string.
    min_size: the image will be resized to this side; a large JPEG may then
      be decoded at 1/2, 1/4 or 1/8 scale, never below `min_size`. 0 keeps
      the full size.
  """
  image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
  is_jpeg = tf.strings.substr(image_bytes, 0, 3) == b"\xff\xd8\xff"
  is_bmp = tf.strings.substr(image_bytes, 0, 2) == b"BM"
  image = tf.cond(
      is_jpeg, lambda: _decode_jpeg(image_bytes, min_size),
      lambda: tf.cond(is_bmp, lambda: _decode_bmp(image_bytes),
                      lambda: _decode_other(image_bytes)))
  image.set_shape([None, None, 3])
  return image


def resize_image(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Resizes a uint8 [H, W, 3] image to uint8 [S, S, 3], antialiased.

  Shrinking on both sides uses area interpolation (a box filter over each
  output pixel's footprint); anything else bilinear with antialiasing. The
  two agree closely, but bilinear antialiasing (the ScaleAndTranslate
  kernel) costs about three times the JPEG decode itself, area about one
  (BUILD_NOTES.md has the figures).
  """
  image.set_shape([None, None, 3])
  size = [image_size, image_size]
  shrink = tf.reduce_min(tf.shape(image)[:2]) >= image_size
  resized = tf.cond(shrink,
                    lambda: tf.image.resize(image, size, method="area"),
                    lambda: tf.image.resize(image, size, antialias=True))
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _decode_other(image_bytes: tf.Tensor) -> tf.Tensor:
  # PNG, GIF (first frame) and WebP: decode_image handles every colour type
  # (palette, grayscale, alpha, 16-bit) when asked for 3 uint8 channels.
  return tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8,
                            expand_animations=False)


def _decode_jpeg(image_bytes: tf.Tensor, min_size: int) -> tf.Tensor:
  """JPEG at the smallest DCT scale that keeps both sides >= min_size."""
  if min_size <= 0:
    return tf.io.decode_jpeg(image_bytes, channels=3)
  shape = tf.image.extract_jpeg_shape(image_bytes)
  shorter = tf.minimum(shape[0], shape[1])
  # Index of the first (largest) ratio that still leaves `min_size` pixels.
  fits = tf.stack([shorter // ratio >= min_size for ratio in _JPEG_RATIOS])
  index = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  branches = [lambda r=ratio: tf.io.decode_jpeg(image_bytes, channels=3,
                                                ratio=r)
              for ratio in _JPEG_RATIOS]
  return tf.switch_case(index, branches)


def _decode_bmp(image_bytes: tf.Tensor) -> tf.Tensor:
  header = _bmp_header(image_bytes)
  return tf.cond(header["bits"] <= 8,
                 lambda: _decode_indexed_bmp(image_bytes, header),
                 lambda: _decode_other(image_bytes))


def _bmp_header(data: tf.Tensor) -> dict:
  """The BMP header fields, from one decode_raw (few ops: quick to trace).

  Bytes 2-53 read as little-endian int32s make the fields at offsets 10
  (pixel data offset), 14 (header size), 18 (width), 22 (height, negative
  when rows are stored top-down), 30 (compression) and 46 (colours used)
  whole words; bits per pixel (offset 28) is the upper half of the word at
  offset 26.
  """
  words = tf.io.decode_raw(tf.strings.substr(data, 2, 52), tf.int32,
                           little_endian=True)
  return {"offset": words[2], "header_size": words[3], "width": words[4],
          "height": words[5], "bits": tf.bitwise.right_shift(words[6], 16),
          "compression": words[7], "colours": words[11]}


def _decode_indexed_bmp(data: tf.Tensor, header: dict) -> tf.Tensor:
  """A 1/2/4/8-bit uncompressed BMP with a colour table, as uint8 RGB.

  The colour table (B, G, R, 0 per entry) follows the header; each row of
  indices is padded to a multiple of 4 bytes.
  """
  bits, width, height = header["bits"], header["width"], header["height"]
  supported = tf.reduce_all(tf.stack([
      header["header_size"] >= 40, header["compression"] == 0, width > 0,
      tf.reduce_any(tf.equal(bits, [1, 2, 4, 8]))]))
  check = tf.debugging.Assert(supported, [
      "BMP: only uncompressed 1/2/4/8-bit indexed BMPs with a Windows "
      "header are supported (not RLE-compressed or OS/2 ones)"])
  with tf.control_dependencies([check]):
    colours = tf.where(header["colours"] > 0, header["colours"],
                       tf.bitwise.left_shift(1, bits))
    table = tf.io.decode_raw(tf.strings.substr(
        data, 14 + header["header_size"], 4 * colours), tf.uint8)
    rgb = tf.reverse(tf.reshape(table, [-1, 4])[:, :3], axis=[1])
    rows = tf.abs(height)
    row_bytes = (bits * width + 31) // 32 * 4
    pixels = tf.io.decode_raw(tf.strings.substr(
        data, header["offset"], row_bytes * rows), tf.uint8)
    pixels = tf.reshape(pixels, [rows, row_bytes, 1])
  # Unpack 8 // bits indices from each byte, most significant bits first.
  per_byte = 8 // bits
  shifts = tf.cast(8 - bits * (tf.range(per_byte) + 1), tf.uint8)
  mask = tf.cast(tf.bitwise.left_shift(1, bits) - 1, tf.uint8)
  indices = tf.bitwise.bitwise_and(tf.bitwise.right_shift(pixels, shifts),
                                   mask)
  indices = tf.reshape(indices, [rows, row_bytes * per_byte])[:, :width]
  # An index past the colour table fails here, as a corrupt file should.
  image = tf.gather(rgb, tf.cast(indices, tf.int32))
  # Rows are stored bottom-up unless the height is negative.
  return tf.where(height > 0, tf.reverse(image, axis=[0]), image)


def sniff_format(head: bytes) -> str:
  """The format name of a file from its first bytes, or "" when unknown.

  For error messages only (plain Python); decoding sniffs in the graph.
  """
  if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
    return "WebP"
  if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
    return "HEIF/AVIF"
  for magic, name in _MAGIC:
    if head.startswith(magic):
      return name
  return ""

"""Decoding: encoded image bytes -> uint8 [H, W, 3], the same way everywhere.

Design notes: ARCHITECTURE.md, "Module notes", `decode.py`.
"""

import re
from typing import Tuple

import tensorflow as tf

from tf_finetune import config

# Signatures, for picking a decoder (in the graph) and for saying why a file
# failed (sniff_format, in Python): a file is of a format when every
# (offset, bytes) of one of its signatures matches.
_WEBP = ((0, b"RIFF"), (8, b"WEBP"))
_SIGNATURES = (
    ("JPEG", ((0, b"\xff\xd8\xff"),)),
    ("PNG", ((0, b"\x89PNG\r\n\x1a\n"),)),
    ("GIF", ((0, b"GIF87a"),)),
    ("GIF", ((0, b"GIF89a"),)),
    ("BMP", ((0, b"BM"),)),
    ("WebP", _WEBP),
    ("TIFF", ((0, b"II*\x00"),)),
    ("TIFF", ((0, b"MM\x00*"),)),
    ("JPEG XL", ((0, b"\x00\x00\x00\x0cjXL "),)),
    ("JPEG XL", ((0, b"\xff\x0a"),)),
    *(("HEIF/AVIF", ((4, b"ftyp" + brand),))
      for brand in (b"heic", b"heix", b"mif1", b"avif")),
)
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WebP")
# Starts the message of a refused image (and file_check's reason).
TOO_LARGE = "image too large to decode"
# The smallest JPEG header libjpeg reads a size from (1 x 1: start of
# image, frame header, scan header, end of image).
_TINY_JPEG = bytes.fromhex("ffd8" "ffc0000b080001000101011100"
                           "ffda000801010000003f00" "ffd9")
# Header bytes read for the dimensions: WebP's VP8X canvas ends at byte 30.
_HEADER_BYTES = 32
# The size fields of those bytes: name -> (offset, length, big-endian).
_SIZE_FIELDS = {
    "png_width": (16, 4, True), "png_height": (20, 4, True),
    "gif_width": (6, 2, False), "gif_height": (8, 2, False),
    "bmp_width": (18, 4, False), "bmp_height": (22, 4, False),
    "vp8_width": (26, 2, False), "vp8_height": (28, 2, False),
    "vp8l_bits": (21, 4, False),  # After the VP8L signature byte 0x2f.
    "vp8x_width": (24, 3, False), "vp8x_height": (27, 3, False),
}
# [_HEADER_BYTES, fields]: each field's value is the sum of its bytes times
# this column.
_SIZE_WEIGHTS = [
    [256**(length - 1 - (row - offset) if big_endian else row - offset)
     if offset <= row < offset + length else 0
     for offset, length, big_endian in _SIZE_FIELDS.values()]
    for row in range(_HEADER_BYTES)]
# The formats whose size is read, WebP by its first chunk.
_SIZE_SIGNATURES = tuple(
    (name, parts) for name, parts in _SIGNATURES
    if name in ("JPEG", "PNG", "GIF", "BMP")) + tuple(
        (f"WebP {chunk.decode()}", _WEBP + ((12, chunk),))
        for chunk in (b"VP8 ", b"VP8L", b"VP8X"))
# The GIF walk (`_gif_dimensions`): full 255-byte sub-blocks skipped in one
# step, and the most steps before a GIF is refused (a 1,000-frame animation
# written by a usual encoder takes a few thousand).
_GIF_SKIP = 64
_GIF_MAX_STEPS = 20_000
# libjpeg's DCT scaling factors, largest first.
_JPEG_RATIOS = (8, 4, 2, 1)


def decode_and_resize(
    image_bytes: tf.Tensor, image_size: int,
    max_pixels: int = config.DEFAULT_MAX_IMAGE_PIXELS) -> tf.Tensor:
  """Decodes one encoded image to uint8 [S, S, 3] (ARCHITECTURE.md, decode.py).

  Args:
    image_bytes: scalar tf.string, the content of an image file.
    image_size: S, the side of the square output.
    max_pixels: refuse an image whose header says more pixels than this,
      before decoding it; 0: no limit.

  Raises:
    tf.errors.InvalidArgumentError (when run): empty, truncated, corrupt,
      not in a supported format, or above `max_pixels`.
  """
  return resize_image(decode_image(image_bytes, min_size=image_size,
                                   max_pixels=max_pixels), image_size)


def decode_image(
    image_bytes: tf.Tensor, min_size: int = 0,
    max_pixels: int = config.DEFAULT_MAX_IMAGE_PIXELS) -> tf.Tensor:
  """Decodes one encoded image to uint8 [H, W, 3], choosing by content.

  Args:
    image_bytes: scalar tf.string.
    min_size: the image will be resized to this side; a large JPEG may then
      be decoded at 1/2, 1/4 or 1/8 scale, never below `min_size`. 0 keeps
      the full size.
    max_pixels: as in `decode_and_resize`.
  """
  image_bytes = check_pixel_limit(image_bytes, max_pixels)
  head = _head(image_bytes)
  image = tf.cond(
      _is_format(head, "JPEG"),
      lambda: _decode_jpeg(image_bytes, min_size),
      lambda: tf.cond(_is_format(head, "BMP"),
                      lambda: _decode_bmp(image_bytes),
                      lambda: _decode_other(image_bytes)))
  image.set_shape([None, None, 3])
  return image


def check_pixel_limit(image_bytes: tf.Tensor, max_pixels: int) -> tf.Tensor:
  """`image_bytes`, made to wait for a check of the header's pixel count.

  Every decoder reads the returned tensor, so none can start before the
  check has passed; an image above `max_pixels` raises InvalidArgumentError
  naming its size and the limit. 0: no limit (the bytes are returned as
  they are).
  """
  image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
  if max_pixels <= 0:
    return image_bytes
  height, width = image_dimensions(image_bytes)
  pixels = height * width
  megapixels = tf.strings.as_string(tf.cast(pixels, tf.float64) / 1e6,
                                    precision=1)
  message = tf.strings.join([
      f"{TOO_LARGE}: ", tf.strings.as_string(width), " x ",
      tf.strings.as_string(height), " pixels (", megapixels,
      f" megapixels) is above the limit of {max_pixels} pixels "
      f"({max_pixels / 1e6:.1f} megapixels) set by --max_image_pixels"])
  check = tf.debugging.Assert(pixels <= max_pixels, [message])
  with tf.control_dependencies([check]):
    return tf.identity(image_bytes)


def too_large_reason(error: tf.errors.OpError) -> str:
  """The one-line message of `check_pixel_limit` in `error`, or "" when the
  error is another one.

  tf.debugging.Assert wraps it: "assertion failed: [MESSAGE]" in a graph,
  "... Summarized data: b'MESSAGE'" eagerly.
  """
  match = re.search(TOO_LARGE + r"[^\]'\n]*", error.message or "")
  return match.group(0) if match else ""


# One traced function: called eagerly (file_check.describe_failure, tests)
# it runs as one graph instead of many small ops one by one.
@tf.function(autograph=False,
             input_signature=[tf.TensorSpec([], tf.string)])
def image_dimensions(image_bytes: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """(height, width), int64, as the header says, without decoding pixels.

  JPEG by `tf.image.extract_jpeg_shape` (libjpeg reads the markers up to the
  frame header), PNG from IHDR, GIF its logical screen or its largest frame
  (`_gif_dimensions`), BMP its info header, WebP its VP8, VP8L or VP8X
  chunk. (0, 0) for other content and for
  headers too short to hold the size: the decoder then fails on them with
  its own message.
  """
  header = tf.cast(tf.io.decode_raw(_head(image_bytes), tf.uint8), tf.int64)
  # Few ops, because tf.data builds a pipeline's functions anew each time:
  # every size field in one multiply-and-sum, every signature in one
  # comparison, and selections instead of tf.cond branches (so the JPEG
  # reader reads a stand-in when the content is no JPEG).
  field = dict(zip(_SIZE_FIELDS, tf.unstack(
      tf.reduce_sum(header[:, None] * _SIZE_WEIGHTS, axis=0))))
  matches = _signature_matches(header, _SIZE_SIGNATURES)

  def signed(value):  # A 32-bit two's complement number.
    return value - tf.cast(value >= 2**31, tf.int64) * 2**32

  # (height, width) per format. BMP: signed, as TensorFlow's decoder reads
  # them (a negative height: rows stored top-down). WebP: VP8 keeps 14 bits
  # per side, VP8L 14 bits per side minus one after its signature byte,
  # VP8X a 24-bit canvas side minus one.
  vp8l = field["vp8l_bits"]
  jpeg = tf.cast(tf.image.extract_jpeg_shape(
      tf.where(matches["JPEG"], image_bytes, _TINY_JPEG))[:2], tf.int64)
  sizes = {
      "JPEG": (jpeg[0], jpeg[1]),
      "PNG": (field["png_height"], field["png_width"]),
      "GIF": _gif_dimensions(
          tf.where(matches["GIF"], image_bytes, b""), field["gif_height"],
          field["gif_width"]),
      "BMP": (tf.abs(signed(field["bmp_height"])),
              tf.abs(signed(field["bmp_width"]))),
      "WebP VP8 ": (field["vp8_height"] % 2**14, field["vp8_width"] % 2**14),
      "WebP VP8L": (vp8l // 2**14 % 2**14 + 1, vp8l % 2**14 + 1),
      "WebP VP8X": (field["vp8x_height"] + 1, field["vp8x_width"] + 1),
  }
  height = width = tf.constant(0, tf.int64)
  for name, (h, w) in sizes.items():
    height = tf.where(matches[name], h, height)
    width = tf.where(matches[name], w, width)
  return height, width


def _signature_matches(header: tf.Tensor, signatures) -> dict:
  """{name: whether one of its signatures matches}, for `signatures` as
  _SIGNATURES, `header` the int64 bytes of `_head`."""
  masks, expected = [], []
  for _, parts in signatures:
    mask, value = [0] * _HEADER_BYTES, [0] * _HEADER_BYTES
    for offset, magic in parts:
      for i, byte in enumerate(magic):
        mask[offset + i], value[offset + i] = 1, byte
    masks.append(mask)
    expected.append(value)
  each = tf.unstack(tf.reduce_all(tf.equal(
      header * tf.constant(masks, tf.int64),
      tf.constant(expected, tf.int64)), axis=1))
  matches = {}
  for (name, _), match in zip(signatures, each):
    matches[name] = matches[name] | match if name in matches else match
  return matches


def _gif_dimensions(image_bytes: tf.Tensor, height: tf.Tensor,
                    width: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """(height, width) of a GIF: its logical screen (`height`, `width`), or
  its largest frame's sides if larger.

  TensorFlow's GIF decoder sizes its output by the largest frame's width
  and height, not by the logical screen, and giflib decodes every frame;
  so a GIF with a 10 x 10 screen and a 1,500 x 1,500 frame decodes to
  1,500 x 1,500. The frames are found by walking the blocks: an image
  descriptor (0x2C: position, width, height, flags, optional local colour
  table, LZW code size) or an extension (0x21, label), each followed by
  data sub-blocks (a length byte, then that many bytes) up to an empty
  one; anything else (the trailer 0x3B) ends the walk, as does the end of
  the bytes (a truncated file then fails in its decoder). Empty bytes:
  the screen as given.

  One sub-block per loop step would cost more than the decode (0.7 s
  against 0.03 s for a 4 MB GIF) and could be made to cost minutes with
  1-byte sub-blocks. Encoders write full 255-byte sub-blocks, so a step
  inside data skips every full one of the next _GIF_SKIP at once, and the
  walk stops after _GIF_MAX_STEPS steps: a GIF that needs more is refused
  (InvalidArgumentError), as one whose size cannot be checked cheaply.
  """
  length = tf.strings.length(image_bytes)

  def read(position):
    # The block's first 10 bytes as integers, zeros past the end.
    piece = tf.strings.substr(image_bytes, tf.minimum(position, length), 10)
    padded = tf.strings.substr(tf.strings.join([piece, b"\0" * 10]), 0, 10)
    return tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int32)

  def colour_table(flags):
    # 3 bytes per entry, 2^(N+1) entries, when the table flag is set.
    return tf.where(flags >= 128, 3 * tf.bitwise.left_shift(2, flags % 8), 0)

  def full_sub_blocks(position):
    # How many sub-blocks from `position` on are full (length 255), up to
    # _GIF_SKIP: their length bytes are 256 bytes apart.
    span = tf.io.decode_raw(tf.strings.substr(
        image_bytes, tf.minimum(position, length), 256 * _GIF_SKIP),
                            tf.uint8)
    span = tf.pad(span, [[0, 256 * _GIF_SKIP - tf.size(span)]])
    not_full = tf.not_equal(span[::256], 255)
    return tf.where(tf.reduce_any(not_full),
                    tf.argmax(not_full, output_type=tf.int32), _GIF_SKIP)

  def step(position, in_data, height, width):
    block = read(position)
    is_image = tf.logical_and(tf.logical_not(in_data), tf.equal(block[0],
                                                                0x2C))
    frame_width = tf.cast(block[5] + 256 * block[6], tf.int64)
    frame_height = tf.cast(block[7] + 256 * block[8], tf.int64)
    height = tf.where(is_image, tf.maximum(height, frame_height), height)
    width = tf.where(is_image, tf.maximum(width, frame_width), width)
    after_block = tf.where(is_image,
                           position + 11 + colour_table(block[9]),
                           position + 2)  # An extension: introducer, label.
    full = full_sub_blocks(position)
    next_position = tf.where(
        in_data, tf.where(full > 0, position + 256 * full,
                          position + 1 + block[0]), after_block)
    # Inside data, a zero length ends the sub-blocks.
    next_in_data = tf.logical_or(tf.logical_not(in_data), block[0] > 0)
    return next_position, next_in_data, height, width

  def more(position, in_data, unused_height, unused_width):
    first = read(position)[0]
    return tf.logical_and(position < length, tf.logical_or(
        in_data, tf.logical_or(tf.equal(first, 0x2C), tf.equal(first, 0x21))))

  # After the header, the screen descriptor and its colour table.
  start = 13 + colour_table(read(10)[0])
  position, in_data, height, width = tf.while_loop(
      more, step, (start, tf.constant(False), height, width),
      maximum_iterations=_GIF_MAX_STEPS)
  done = tf.logical_not(more(position, in_data, height, width))
  check = tf.debugging.Assert(done, [
      f"GIF: more than {_GIF_MAX_STEPS} blocks to read before its frame "
      "sizes are known (not how encoders write GIFs); refused rather than "
      "decoded (--max_image_pixels=0 turns the pixel limit off)"])
  with tf.control_dependencies([check]):
    return tf.identity(height), tf.identity(width)


def _head(image_bytes: tf.Tensor) -> tf.Tensor:
  """The first _HEADER_BYTES bytes, zero-padded to that length.

  Padded, so that every signature and size field can be read from a short
  file too: it reads as no format or size 0, and its decoder then fails on
  it with its own message.
  """
  image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
  return tf.strings.substr(
      tf.strings.join([tf.strings.substr(image_bytes, 0, _HEADER_BYTES),
                       b"\0" * _HEADER_BYTES]), 0, _HEADER_BYTES)


def _is_format(head: tf.Tensor, name: str) -> tf.Tensor:
  """Whether `head` (from `_head`) has a signature of format `name`."""
  return tf.reduce_any(tf.stack([
      tf.reduce_all(tf.stack([
          tf.equal(tf.strings.substr(head, offset, len(magic)), magic)
          for offset, magic in parts]))
      for format_name, parts in _SIGNATURES if format_name == name]))


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
  for name, parts in _SIGNATURES:
    if all(head[offset:offset + len(magic)] == magic
           for offset, magic in parts):
      return name
  return ""

"""Encoded test images of every kind a real folder holds, with the pixels
each should decode to (shared by test_decode.py and test_data.py)."""

import io
import struct
import zlib

import numpy as np
import tensorflow as tf
from PIL import Image


def photo(height=30, width=41, seed=0):
  """Smooth colour gradients with a little noise: JPEG-friendly pixels.

  An odd width exercises BMP row padding.
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  base = np.stack([xx * 200 // width + 20, yy * 200 // height + 20,
                   (xx + yy) * 100 // (height + width) + 60], -1)
  return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def encode(image, fmt, **options):
  """PIL image (or uint8 array) -> bytes of `fmt`."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **options)
  return buffer.getvalue()


def indexed_bmp(indices, palette, bits, top_down=False):
  """A BITMAPINFOHEADER BMP of `bits` (1, 4 or 8) per pixel; PIL writes
  only 1 and 8, and only bottom-up."""
  height, width = indices.shape
  row_bytes = (bits * width + 31) // 32 * 4
  rows = []
  for row in indices:
    value = 0
    for index in row:
      value = (value << bits) | int(index)
    packed = value << (row_bytes * 8 - bits * width)
    rows.append(packed.to_bytes(row_bytes, "big"))
  pixels = b"".join(rows if top_down else rows[::-1])
  table = b"".join(bytes([b, g, r, 0]) for r, g, b in palette)
  offset = 14 + 40 + len(table)
  header = struct.pack("<2sIHHI", b"BM", offset + len(pixels), 0, 0, offset)
  info = struct.pack("<IiiHHIIiiII", 40, width, -height if top_down else height,
                     1, bits, 0, len(pixels), 2835, 2835, len(palette), 0)
  return header + info + table + pixels


def _rgb(image):
  return np.asarray(image.convert("RGB"))


def decodable_cases():
  """{name: (bytes, expected uint8 [H, W, 3], max mean abs difference)}.

  Lossless formats must decode exactly; JPEGs within their loss.
  """
  rgb = photo()
  image = Image.fromarray(rgb)
  palette = image.convert("P", palette=Image.ADAPTIVE, colors=200)
  gray16 = np.random.default_rng(1).integers(0, 65536, rgb.shape[:2],
                                             np.uint16)
  rgb16 = np.random.default_rng(2).integers(0, 65536, rgb.shape, np.uint16)
  frames = [Image.fromarray(photo(seed=s)).convert("P") for s in range(3)]
  animated = io.BytesIO()
  frames[0].save(animated, format="GIF", save_all=True,
                 append_images=frames[1:])
  colours = [(255, 0, 0), (0, 128, 0), (20, 40, 250), (250, 250, 0)] + [
      (i * 16, 255 - i * 16, 90) for i in range(12)]
  nibbles = np.random.default_rng(3).integers(0, 16, (9, 13))
  bits = np.random.default_rng(4).integers(0, 2, (9, 13))
  mono = [(10, 20, 30), (240, 230, 220)]

  def lut(indices, table):
    return np.asarray(table, np.uint8)[indices]

  return {
      "baseline.jpg": (encode(rgb, "JPEG", quality=95), rgb, 5.0),
      "progressive.jpg": (encode(rgb, "JPEG", quality=95, progressive=True),
                          rgb, 5.0),
      "cmyk.jpg": (encode(image.convert("CMYK"), "JPEG", quality=95), rgb, 5.0),
      "gray.jpg": (encode(image.convert("L"), "JPEG", quality=95),
                   _rgb(image.convert("L")), 5.0),
      "gray.png": (encode(image.convert("L"), "PNG"),
                   _rgb(image.convert("L")), 0),
      "palette.png": (encode(palette, "PNG"), _rgb(palette), 0),
      "palette_transparent.png": (encode(palette, "PNG", transparency=0),
                                  _rgb(palette), 0),
      "rgba.png": (encode(image.convert("RGBA"), "PNG"), rgb, 0),
      "gray16.png": (tf.io.encode_png(gray16[..., None]).numpy(),
                     np.repeat((gray16 >> 8).astype(np.uint8)[..., None], 3,
                               -1), 0),
      "rgb16.png": (tf.io.encode_png(rgb16).numpy(),
                    (rgb16 >> 8).astype(np.uint8), 0),
      "still.gif": (encode(palette, "GIF"), _rgb(palette), 0),
      "animated.gif": (animated.getvalue(), _rgb(frames[0]), 0),
      "rgb24.bmp": (encode(rgb, "BMP"), rgb, 0),
      "rgba32.bmp": (encode(image.convert("RGBA"), "BMP"), rgb, 0),
      "gray8.bmp": (encode(image.convert("L"), "BMP"),
                    _rgb(image.convert("L")), 0),
      "palette8.bmp": (encode(palette, "BMP"), _rgb(palette), 0),
      "palette4.bmp": (indexed_bmp(nibbles, colours, 4),
                       lut(nibbles, colours), 0),
      "mono1_topdown.bmp": (indexed_bmp(bits, mono, 1, top_down=True),
                            lut(bits, mono), 0),
      "lossless.webp": (encode(rgb, "WEBP", lossless=True), rgb, 0),
  }


def undecodable_cases():
  """{name: (bytes, fragment of the reason a folder source gives)}."""
  big = encode(photo(200, 160, seed=5), "JPEG", progressive=True)
  png = encode(photo(), "PNG")
  rle = bytearray(encode(Image.fromarray(photo()).convert("P"), "BMP"))
  rle[30:34] = struct.pack("<I", 1)  # BI_RLE8, with uncompressed data.
  frames = [Image.fromarray(photo(seed=s)) for s in range(2)]
  webp = io.BytesIO()
  frames[0].save(webp, format="WEBP", save_all=True, append_images=frames[1:])
  return {
      "empty.jpg": (b"", "empty file (0 bytes)"),
      "truncated.jpg": (big[: len(big) // 2], "undecodable JPEG"),
      "truncated.png": (png[: len(png) - 20], "undecodable PNG"),
      "text.jpg": (b"this is not an image\n" * 5, "not an image"),
      "error_page.png": (b"<html><body>404</body></html>", "not an image"),
      "scan.tiff": (encode(photo(), "TIFF"), "unsupported image format TIFF"),
      "rle8.bmp": (bytes(rle), "not RLE-compressed"),
      "animated.webp": (webp.getvalue(), "undecodable WebP"),
      # Refused before decoding, so its pixel data need not be there.
      "huge.png": (with_size(png, 23000, 23000),
                   "image too large to decode: 23000 x 23000 pixels (529.0 "
                   "megapixels) is above the limit of 89478485 pixels"),
  }


def header_cases():
  """{name: bytes} of small real images, one per way a size is stored:
  JPEG (SOF), PNG (IHDR), GIF (screen and frame), BMP, WebP VP8, VP8L and
  VP8X."""
  rgb = photo()
  return {
      "baseline.jpg": encode(rgb, "JPEG"),
      "progressive.jpg": encode(rgb, "JPEG", progressive=True),
      "rgb.png": encode(rgb, "PNG"),
      "still.gif": encode(Image.fromarray(rgb).convert("P"), "GIF"),
      "rgb24.bmp": encode(rgb, "BMP"),
      "palette4.bmp": indexed_bmp(np.zeros((9, 13), int), [(1, 2, 3)] * 16,
                                  4, top_down=True),
      "lossy.webp": encode(rgb, "WEBP", quality=90),
      "lossless.webp": encode(rgb, "WEBP", lossless=True),
      # Exif makes an extended (VP8X) WebP.
      "extended.webp": encode(rgb, "WEBP", quality=90,
                              exif=b"Exif\0\0II*\0"),
  }


def with_size(content, width, height):
  """`content` (from header_cases) with its header saying width x height;
  the pixel data is left as it is, so decoding it would fail."""
  data = bytearray(content)
  if data.startswith(b"\xff\xd8"):
    sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
  elif data.startswith(b"\x89PNG"):
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  elif data.startswith(b"GIF"):
    data[6:10] = struct.pack("<HH", width, height)
    frame = data.find(b",\0\0\0\0")  # The frame at (0, 0).
    data[frame + 5:frame + 9] = struct.pack("<HH", width, height)
  elif data.startswith(b"BM"):
    data[18:26] = struct.pack("<ii", width, height)
  elif data[12:16] == b"VP8 ":
    data[26:30] = struct.pack("<HH", width, height)
  elif data[12:16] == b"VP8L":
    bits = struct.unpack("<I", data[21:25])[0] & ~(2**28 - 1)
    data[21:25] = struct.pack("<I", bits | (width - 1) | (height - 1) << 14)
  elif data[12:16] == b"VP8X":
    data[24:30] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(
        3, "little")
  else:
    raise ValueError("not a case of header_cases")
  return bytes(data)


def gif_with_large_frame(screen, frame):
  """A GIF whose logical screen is screen x screen pixels and whose one
  frame is frame x frame, all of colour 1, really LZW-coded."""
  image = Image.new("P", (frame, frame), 1)
  image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
  data = bytearray(encode(image, "GIF"))
  data[6:10] = struct.pack("<HH", screen, screen)
  return bytes(data)

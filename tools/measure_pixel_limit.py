"""What one decompression-bomb PNG costs the serving graph, with and without
the pixel limit.

  python tools/measure_pixel_limit.py [--side=23000] [--image_size=224]

Writes a one-colour grayscale PNG of SIDE x SIDE pixels (514 KB at 23,000:
zlib shrinks the identical rows about 1,000-fold), exports the package's
model (ResNet50, random weights, --image_size) twice, once with the default
--max_image_pixels and once with 0 (no limit), and sends the PNG to each
export's `serving_default` in a fresh process, after one small warm-up
image. Prints, per export, the seconds of that request, how it ended, and
the growth of the process's peak resident memory (ru_maxrss) during it.
"""

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("side", 23000, "Width and height of the PNG.")
flags.DEFINE_integer("image_size", 224, "Input side of the exported model.")
flags.DEFINE_string("child_export", "", "Internal: serve the PNG with this "
                    "export in this process and print the figures as JSON.")
flags.DEFINE_string("child_image", "", "Internal: the PNG to send.")
FLAGS = flags.FLAGS


def write_solid_png(path: str, side: int) -> int:
  """Writes a side x side 8-bit grayscale PNG of one shade, row by row;
  returns its size in bytes. Memory: one row, whatever the side."""
  def chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body)))

  row = b"\0" + b"\x80" * side  # Filter byte 0, then the pixels.
  compressor = zlib.compressobj(9)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n")
    f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0,
                                       0)))
    pieces = [compressor.compress(row) for _ in range(side)]
    pieces.append(compressor.flush())
    f.write(chunk(b"IDAT", b"".join(pieces)))
    f.write(chunk(b"IEND", b""))
  return os.path.getsize(path)


def export_model(folder: str, image_size: int, max_image_pixels: int) -> str:
  from tf_finetune import export, model as model_lib
  model = model_lib.build_model(2, image_size, "none")
  return export.export_saved_model(model, ["a", "b"], image_size, folder,
                                   max_image_pixels=max_image_pixels)


def serve_once(export_path: str, image_path: str) -> dict:
  """In this process: one warm-up request, then the PNG; the figures."""
  import tensorflow as tf
  from tf_finetune import decode
  loaded = tf.saved_model.load(export_path)
  serve = loaded.signatures["serving_default"]
  small = tf.io.encode_png(tf.zeros([64, 64, 3], tf.uint8))
  serve(image_bytes=tf.reshape(small, [1]))
  with open(image_path, "rb") as f:
    content = f.read()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  started = time.perf_counter()
  try:
    serve(image_bytes=tf.constant([content]))["probabilities"].numpy()
    outcome = "answered"
  except tf.errors.InvalidArgumentError as error:
    outcome = decode.too_large_reason(error) or "refused: " + " ".join(
        (error.message or "").split())[:200]
  seconds = time.perf_counter() - started
  after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {"seconds": seconds, "peak_rss_growth_mb": (after - before) / 1024,
          "outcome": outcome}


def main(argv):
  del argv
  if FLAGS.child_export:
    print(json.dumps(serve_once(FLAGS.child_export, FLAGS.child_image)))
    return
  from tf_finetune import config
  folder = tempfile.mkdtemp(prefix="pixel_limit_")
  image = os.path.join(folder, "bomb.png")
  started = time.perf_counter()
  size = write_solid_png(image, FLAGS.side)
  print(f"{FLAGS.side} x {FLAGS.side} PNG: {size / 1e3:.0f} KB, written in "
        f"{time.perf_counter() - started:.1f} s")
  for limit in (config.DEFAULT_MAX_IMAGE_PIXELS, 0):
    path = export_model(os.path.join(folder, f"limit_{limit}"),
                        FLAGS.image_size, limit)
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--child_export={path}",
         f"--child_image={image}"], capture_output=True, text=True,
        check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))})
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"--max_image_pixels={limit}: {result['seconds']:.2f} s, peak RSS "
          f"+{result['peak_rss_growth_mb']:.0f} MB, {result['outcome']}")
  shutil.rmtree(folder)


if __name__ == "__main__":
  app.run(main)

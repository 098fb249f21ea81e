"""The up-front check of a folder source: which files cannot be decoded, why.

Design notes: ARCHITECTURE.md, "Module notes", `file_check.py`.
"""

import hashlib
import os
import re
import time
from typing import Dict, Optional, Sequence

import keras
import tensorflow as tf
from absl import logging

from tf_finetune import config, decode, files

# The check decodes at this side: a JPEG of 8x this or more is then decoded
# at 1/8 scale, by the same code path as training.
CHECK_SIZE = 16
# A progress bar is shown when checking at least this many files.
PROGRESS_MIN_FILES = 2000
# A cache entry is the identity (`_identity`), then the verdict.
_IDENTITY_SIZE = 3
# Part of the cache key: a new decoder may decode what an old one could not.
_CACHE_VERSION = f"decode-v2/tf-{tf.__version__}"


def find_undecodable(paths: Sequence[str], progress: Optional[bool] = None,
                     cache_file: str = "",
                     max_pixels: int = config.DEFAULT_MAX_IMAGE_PIXELS
                     ) -> Dict[str, str]:
  """Finds the files that `decode.decode_and_resize` cannot decode.

  Args:
    paths: candidate image files.
    progress: show a progress bar; None: when checking PROGRESS_MIN_FILES
      or more files.
    cache_file: JSON file of earlier verdicts to reuse and update; "" for
      none.
    max_pixels: files whose header says more pixels are not decoded but
      refused (`--max_image_pixels`); 0: no limit.

  Returns:
    {path: reason} for every file that cannot be used.
  """
  identities = {path: _identity(path, max_pixels) for path in paths}
  known = _load_cache(cache_file)
  size = _IDENTITY_SIZE
  verdicts = {path: known[path][size] for path in paths
              if path in known and known[path][:size] == identities[path]}
  unchecked = [path for path in paths if path not in verdicts]
  verdicts.update(_check(unchecked, progress, max_pixels))
  if cache_file and unchecked:
    _save_cache(cache_file, {path: [*identities[path], verdicts[path]]
                             for path in paths})
  return {path: reason for path, reason in verdicts.items() if reason}


def cache_file_for(root: str, data_dir: str = "") -> str:
  """Where the verdicts for dataset folder `root` are kept."""
  base = data_dir or os.path.expanduser("~/.cache/tf_finetune")
  key = hashlib.sha256(os.path.realpath(root).encode("utf-8")).hexdigest()
  return os.path.join(base, "checks", key[:24] + ".json")


def _check(paths: Sequence[str], progress: Optional[bool],
           max_pixels: int) -> Dict[str, str]:
  """{path: reason, or "" when it decodes} for every path: one parallel pass
  over all, then the few failures read again, eagerly, to say why."""
  if not paths:
    return {}
  started = time.perf_counter()

  def check(index, path):
    image = decode.decode_and_resize(tf.io.read_file(path), CHECK_SIZE,
                                     max_pixels)
    # Returning something computed from the pixels keeps the decode from
    # being optimised away.
    return index, tf.reduce_max(image)

  checked = (tf.data.Dataset.from_tensor_slices((tf.range(len(paths)),
                                                 list(paths)))
             .map(check, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=False)
             .ignore_errors()
             .batch(256))
  if progress is None:
    progress = len(paths) >= PROGRESS_MIN_FILES
  bar = keras.utils.Progbar(len(paths), unit_name="file") if progress else None
  decoded = set()
  for indices, _ in checked.as_numpy_iterator():
    decoded.update(int(i) for i in indices)
    if bar:
      bar.update(len(decoded))
  verdicts = {path: "" if index in decoded
              else describe_failure(path, max_pixels)
              for index, path in enumerate(paths)}
  if bar:
    bar.update(len(paths), finalize=True)
  seconds = time.perf_counter() - started
  logging.info("Checked %d image files in %.1f s (%.0f files/s): %d cannot "
               "be used.", len(paths), seconds, len(paths) / seconds,
               len(paths) - len(decoded))
  return verdicts


def describe_failure(path: str,
                     max_pixels: int = config.DEFAULT_MAX_IMAGE_PIXELS) -> str:
  """One line saying why `path` cannot be decoded (with the pixel limit
  `max_pixels`)."""
  try:
    with open(path, "rb") as f:
      content = f.read()
  except OSError as error:
    return f"unreadable: {error.strerror or error}"
  if not content:
    return "empty file (0 bytes)"
  found = decode.sniff_format(content[:32])
  supported = ", ".join(decode.SUPPORTED_FORMATS)
  if not found:
    return (f"not an image: the content is none of {supported} "
            f"(starts with {content[:8]!r})")
  if found not in decode.SUPPORTED_FORMATS:
    return (f"unsupported image format {found}; convert it to one of "
            f"{supported}")
  try:
    decode.decode_and_resize(tf.constant(content), CHECK_SIZE, max_pixels)
  except tf.errors.OpError as error:
    too_large = decode.too_large_reason(error)
    if too_large:
      return too_large
    return (f"undecodable {found} (truncated, corrupt or an unsupported "
            f"variant): {_op_error_text(error)}")
  return f"could not be decoded as {found}"


def _op_error_text(error: tf.errors.OpError) -> str:
  """TF's own words, without the '{{function_node ...}}' and '[Op:...]'."""
  text = re.sub(r"\{\{.*?\}\}", "", error.message or "")
  text = re.sub(r"\[Op:.*", "", text, flags=re.DOTALL)
  # tf.debugging asserts append the compared values; the message says it.
  text = re.sub(r"Condition x .*", "", text, flags=re.DOTALL)
  return " ".join(text.split()) or type(error).__name__


def _identity(path: str, max_pixels: int) -> list:
  """[size, mtime in ns, pixel limit]: a changed file, or the same file
  under another limit, gets checked again."""
  try:
    stat = os.stat(path)
  except OSError:
    return [-1, -1, max_pixels]
  return [stat.st_size, stat.st_mtime_ns, max_pixels]


def _load_cache(cache_file: str) -> dict:
  """{path: [size, mtime_ns, max_pixels, reason]}; {} when missing, stale
  or unreadable."""
  if not cache_file:
    return {}
  try:
    content = files.read_json(cache_file)
  except (tf.errors.OpError, ValueError):
    return {}  # Missing or damaged: it only costs a re-check.
  if not isinstance(content, dict) or content.get("version") != _CACHE_VERSION:
    return {}
  return content.get("files", {})


def _save_cache(cache_file: str, entries: dict) -> None:
  """Writes atomically; a failure to write costs only a re-check next time."""
  try:
    files.write_json_atomic(cache_file, {"version": _CACHE_VERSION,
                                         "files": entries}, indent=None)
  except (OSError, tf.errors.OpError) as error:
    logging.warning("Could not save the file check results to %s: %s",
                    cache_file, error)

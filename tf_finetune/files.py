"""Atomic, durable writes and safe reads on any file system TensorFlow reads.

Design notes: ARCHITECTURE.md, "Module notes", `files.py`.
"""

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterator, List, Optional

import tensorflow as tf

TEMP_PREFIX = ".tmp-"
# mkstemp creates files readable by their owner only; the files written here
# are read by other users too (TF Serving's container, a colleague).
_FILE_MODE = 0o644


def is_local(path: str) -> bool:
  """True for a path of the machine's own file system (no `scheme://`)."""
  return "://" not in path


def exists(path: str) -> bool:
  return tf.io.gfile.exists(path)


def isdir(path: str) -> bool:
  return tf.io.gfile.isdir(path)


def isfile(path: str) -> bool:
  """True when `path` exists and is not a folder."""
  return exists(path) and not isdir(path)


def makedirs(path: str) -> None:
  """Creates `path` and its parents; nothing happens if it exists."""
  tf.io.gfile.makedirs(path)


def listdir(path: str) -> List[str]:
  """Names of the entries of folder `path`, without a trailing slash (which
  some object stores append to sub-folder names)."""
  return [name.rstrip("/") for name in tf.io.gfile.listdir(path)]


def remove(path: str) -> None:
  """Deletes the file `path`; nothing happens if it does not exist."""
  try:
    tf.io.gfile.remove(path)
  except tf.errors.NotFoundError:
    pass


def remove_tree(path: str) -> None:
  """Deletes folder `path` and everything under it, if it exists."""
  try:
    tf.io.gfile.rmtree(path)
  except tf.errors.NotFoundError:
    pass


def read_bytes(path: str) -> bytes:
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
  """The JSON value in `path`.

  Raises:
    tf.errors.NotFoundError: no such file.
    ValueError: not JSON (json.JSONDecodeError, UnicodeDecodeError).
  """
  return json.loads(read_text(path))


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` in place, not atomically: for files inside a
  folder that is itself moved into place whole (`move_folder_into_place`)."""
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(data)


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Replaces the content of `path` with `data`, all or nothing (module
  docstring); creates the folder if needed."""
  makedirs(_parent(path))
  if is_local(path):
    _write_local_atomic(path, data)
  else:
    _write_remote_atomic(path, data)


def copy_atomic(source: str, target: str) -> None:
  """Replaces `target` with a copy of file `source`, all or nothing
  (`atomic_output`). The bytes stream through TensorFlow's file system, so
  a model file (hundreds of MB with its optimizer) never sits whole in this
  process's memory."""
  with atomic_output(target) as temp:
    tf.io.gfile.copy(source, temp, overwrite=True)


def write_text_atomic(path: str, text: str) -> None:
  """`write_bytes_atomic` of `text` in UTF-8."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, value: Any,
                      indent: Optional[int] = 2) -> None:
  """`write_text_atomic` of `value` as JSON. A value that is not JSON
  raises before anything is written."""
  write_text_atomic(path, json.dumps(value, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
  """Yields a local path to write the new `path` to, for writers that want a
  file name (`model.save`, `save_weights`, matplotlib's `print_png`).

  The yielded name ends with `path`'s base name, so writers that check the
  extension (Keras: `.keras`, `.weights.h5`) accept it. When the block ends
  without an error the file is moved into place as `write_bytes_atomic`
  would; when it raises (also KeyboardInterrupt) the file is deleted and
  `path` is left as it was.

  Example:
    with files.atomic_output("gs://bucket/run/model.keras") as temp:
      model.save(temp)
  """
  if is_local(path):
    with _local_atomic_output(path) as temp:
      yield temp
  else:
    with _uploaded_output(path) as temp:
      yield temp


@contextlib.contextmanager
def temp_folder(parent: str) -> Iterator[str]:
  """Yields a new, empty hidden folder inside `parent` (created if needed),
  for a folder written file by file and then moved into place whole
  (`move_folder_into_place`). Whatever is still there at the end, after an
  error too, is deleted."""
  path = _join(parent, f"{TEMP_PREFIX}{uuid.uuid4().hex[:16]}")
  makedirs(path)
  try:
    yield path
  finally:
    remove_tree(path)


def move_folder_into_place(source: str, target: str) -> None:
  """Moves the finished folder `source` to `target`, which must not exist.

  Local: every file and folder under `source` is fsynced, then one
  `os.rename` (atomic; readers see the whole folder or none) and an fsync of
  the parent. Elsewhere: file by file, as the store renames (module
  docstring).

  Raises:
    FileExistsError: `target` exists (another writer took the name).
  """
  if is_local(source) and is_local(target):
    _sync_tree(source)
    _rename_local_folder(source, target)
    _sync_folder(_parent(os.path.abspath(target)))
  else:
    _move_remote_folder(source, target)


# ------------------------------------------------------------------ local


def _write_local_atomic(path: str, data: bytes) -> None:
  folder = _parent(os.path.abspath(path))
  handle, temp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX,
                                  suffix="-" + os.path.basename(path))
  try:
    with os.fdopen(handle, "wb") as f:
      os.fchmod(f.fileno(), _FILE_MODE)
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temp, path)
  except BaseException:
    _remove_local(temp)
    raise
  _sync_folder(folder)


@contextlib.contextmanager
def _local_atomic_output(path: str) -> Iterator[str]:
  folder = _parent(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  temp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex[:16]}-"
                      f"{os.path.basename(path)}")
  try:
    yield temp
    _sync_file(temp)
    os.replace(temp, path)
  except BaseException:
    _remove_local(temp)
    raise
  _sync_folder(folder)


def _rename_local_folder(source: str, target: str) -> None:
  # os.rename replaces an empty folder but fails on a non-empty one or a
  # file; an existing version must never be replaced, so check first too.
  if os.path.lexists(target):
    raise FileExistsError(f"{target} exists.")
  try:
    os.rename(source, target)
  except OSError as e:
    if os.path.lexists(target):
      raise FileExistsError(f"{target} exists.") from e
    raise


def _sync_file(path: str) -> None:
  with open(path, "rb") as f:
    os.fsync(f.fileno())


def _sync_folder(folder: str) -> None:
  handle = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(handle)
  finally:
    os.close(handle)


def _sync_tree(folder: str) -> None:
  for parent, _, names in os.walk(folder):
    for name in names:
      _sync_file(os.path.join(parent, name))
    _sync_folder(parent)


def _remove_local(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


# ----------------------------------------------------------------- remote


def _temp_name_beside(path: str) -> str:
  return _join(_parent(path),
               f"{TEMP_PREFIX}{uuid.uuid4().hex[:16]}-{_basename(path)}")


def _write_remote_atomic(path: str, data: bytes) -> None:
  temp = _temp_name_beside(path)
  try:
    write_bytes(temp, data)
    tf.io.gfile.rename(temp, path, overwrite=True)
  except BaseException:
    remove(temp)
    raise


@contextlib.contextmanager
def _uploaded_output(path: str) -> Iterator[str]:
  local_folder = tempfile.mkdtemp(prefix="tf_finetune-")
  try:
    local = os.path.join(local_folder, _basename(path))
    yield local
    makedirs(_parent(path))
    temp = _temp_name_beside(path)
    try:
      tf.io.gfile.copy(local, temp, overwrite=True)
      tf.io.gfile.rename(temp, path, overwrite=True)
    except BaseException:
      remove(temp)
      raise
  finally:
    shutil.rmtree(local_folder, ignore_errors=True)


def _move_remote_folder(source: str, target: str) -> None:
  if exists(target):
    raise FileExistsError(f"{target} exists.")
  for parent, _, names in tf.io.gfile.walk(source):
    relative = parent[len(source):].lstrip("/")
    destination = _join(target, relative) if relative else target
    makedirs(destination)
    for name in names:
      tf.io.gfile.rename(_join(parent, name), _join(destination, name),
                         overwrite=False)
  remove_tree(source)


# ------------------------------------------------------------------ paths


def _parent(path: str) -> str:
  return path.rstrip("/").rsplit("/", 1)[0] if "/" in path else "."


def _basename(path: str) -> str:
  return path.rstrip("/").rsplit("/", 1)[-1]


def _join(folder: str, name: str) -> str:
  return folder.rstrip("/") + "/" + name

"""tf_finetune.files: atomic writes leave the old file or the new one, never a
mix and no temporary files, on the local disk and on TensorFlow's in-memory
`ram://` file system (standing in for gs:// and the other gfile stores)."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_finetune import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "ram"])
def folder(request, tmp_path):
  """An empty folder on the local disk or on ram://."""
  if request.param == "local":
    yield str(tmp_path)
    return
  path = f"ram://test-files-{uuid.uuid4().hex}"
  files.makedirs(path)
  yield path
  files.remove_tree(path)


def temp_files(folder):
  return [name for name in files.listdir(folder)
          if name.startswith(files.TEMP_PREFIX)]


def test_writes_then_replaces_whole_files(folder):
  path = f"{folder}/sub/report.json"
  files.write_json_atomic(path, {"a": 1})  # creates sub/
  files.write_json_atomic(path, {"b": [1, 2]})
  assert files.read_json(path) == {"b": [1, 2]}
  files.write_text_atomic(f"{folder}/flags.cfg", "--seed=1\n")
  assert files.read_text(f"{folder}/flags.cfg") == "--seed=1\n"
  files.write_bytes_atomic(f"{folder}/x.bin", b"\x00\xff")
  assert files.read_bytes(f"{folder}/x.bin") == b"\x00\xff"
  assert sorted(files.listdir(folder)) == ["flags.cfg", "sub", "x.bin"]
  assert files.listdir(f"{folder}/sub") == ["report.json"]


def test_value_that_is_not_json_leaves_the_old_file(folder):
  path = f"{folder}/report.json"
  files.write_json_atomic(path, {"kept": True})
  with pytest.raises(TypeError):
    files.write_json_atomic(path, {"bad": object()})
  assert files.read_json(path) == {"kept": True}
  assert temp_files(folder) == []


def test_failure_before_the_rename_leaves_the_old_file(folder, monkeypatch):
  path = f"{folder}/report.json"
  files.write_json_atomic(path, {"kept": True})

  def fail(*args, **kwargs):
    raise OSError("disk full")

  # The last step before the target changes: fsync locally, rename elsewhere.
  if files.is_local(folder):
    monkeypatch.setattr(os, "fsync", fail)
  else:
    monkeypatch.setattr(tf.io.gfile, "rename", fail)
  with pytest.raises(OSError, match="disk full"):
    files.write_json_atomic(path, {"kept": False})
  monkeypatch.undo()
  assert files.read_json(path) == {"kept": True}
  assert temp_files(folder) == []


def test_atomic_output_moves_the_finished_file_into_place(folder):
  path = f"{folder}/model.keras"
  inputs = keras.Input((3,))
  model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
  with files.atomic_output(path) as temp:
    assert files.is_local(temp) and temp.endswith("model.keras")
    model.save(temp)  # Keras refuses a name not ending in .keras
  with zipfile.ZipFile(io.BytesIO(files.read_bytes(path))) as archive:
    assert "config.json" in archive.namelist()
  assert temp_files(folder) == []
  assert not os.path.exists(temp)


def test_atomic_output_that_fails_leaves_the_old_file(folder):
  path = f"{folder}/curves.png"
  files.write_bytes_atomic(path, b"old")
  with pytest.raises(KeyboardInterrupt):
    with files.atomic_output(path) as temp:
      with open(temp, "wb") as f:
        f.write(b"half of the new")
      raise KeyboardInterrupt  # Ctrl-C mid-write
  assert files.read_bytes(path) == b"old"
  assert temp_files(folder) == []
  assert not os.path.exists(temp)


def test_copy_replaces_the_target_whole_or_not_at_all(folder):
  source, target = f"{folder}/a/model.keras", f"{folder}/b/model.keras"
  data = os.urandom(3 << 20)  # Larger than gfile's copy buffer.
  files.write_bytes_atomic(source, data)
  files.write_bytes_atomic(target, b"old")
  files.copy_atomic(source, target)
  assert files.read_bytes(target) == data
  with pytest.raises(tf.errors.NotFoundError):
    files.copy_atomic(f"{folder}/a/missing.keras", target)
  assert files.read_bytes(target) == data
  assert temp_files(f"{folder}/b") == []


def test_folder_moves_into_place_whole_and_never_over_another(folder):
  with files.temp_folder(folder) as staging:
    files.makedirs(f"{staging}/assets")
    files.write_bytes(f"{staging}/saved_model.pb", b"graph")
    files.write_bytes(f"{staging}/assets/names.txt", b"a\nb\n")
    files.move_folder_into_place(staging, f"{folder}/1")
  assert files.read_bytes(f"{folder}/1/saved_model.pb") == b"graph"
  assert files.read_bytes(f"{folder}/1/assets/names.txt") == b"a\nb\n"
  with files.temp_folder(folder) as staging:
    files.write_bytes(f"{staging}/saved_model.pb", b"other graph")
    with pytest.raises(FileExistsError):
      files.move_folder_into_place(staging, f"{folder}/1")
  assert files.read_bytes(f"{folder}/1/saved_model.pb") == b"graph"
  assert sorted(files.listdir(folder)) == ["1"]  # the staging folder is gone


def test_missing_files_and_folders(folder):
  assert not files.exists(f"{folder}/nothing")
  files.remove(f"{folder}/nothing")
  files.remove_tree(f"{folder}/nothing")
  with pytest.raises(tf.errors.NotFoundError):
    files.read_json(f"{folder}/nothing")
  files.write_text_atomic(f"{folder}/bad.json", "{not json")
  with pytest.raises(ValueError):
    files.read_json(f"{folder}/bad.json")


def test_isfile_tells_files_from_folders(folder):
  files.write_text_atomic(f"{folder}/sub/a.txt", "a")
  assert files.isfile(f"{folder}/sub/a.txt")
  assert not files.isfile(f"{folder}/sub")
  assert not files.isfile(f"{folder}/nothing")


def test_local_files_are_readable_by_others(tmp_path):
  path = str(tmp_path / "report.json")
  files.write_json_atomic(path, {})
  assert os.stat(path).st_mode & 0o777 == 0o644


# Killed with SIGKILL after the new content is written but before it is
# renamed into place: no except or finally runs, as in a power cut.
KILLED_BEFORE_RENAME = textwrap.dedent("""
    import os, signal, sys
    from tf_finetune import files

    def killed(handle):
      os.kill(os.getpid(), signal.SIGKILL)

    os.fsync = killed
    files.write_json_atomic(sys.argv[1], {"new": "x" * 100000})
""")


@pytest.mark.slow
def test_crash_mid_write_keeps_the_old_local_file(tmp_path):
  path = tmp_path / "report.json"
  files.write_json_atomic(str(path), {"old": True})
  result = subprocess.run(
      [sys.executable, "-c", KILLED_BEFORE_RENAME, str(path)], cwd=ROOT,
      capture_output=True, text=True, timeout=300)
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  assert json.loads(path.read_text()) == {"old": True}
  # The crash did happen with the new content on its way: it is in the
  # hidden temporary file, which no reader takes for the report.
  [temp] = temp_files(str(tmp_path))
  assert np.isclose(os.path.getsize(tmp_path / temp), 100000, rtol=0.01)

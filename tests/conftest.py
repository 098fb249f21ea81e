"""Shared by the test files: the command-line runner and ONE real training
run of configs/smoke.cfg per test session, reused by every test that needs
a trained workdir (tests/test_main.py, test_evaluate.py, test_predict.py,
test_serving.py, test_litert.py). Tests using it may add files to the workdir but must not
add export versions: tests/test_main.py checks the layout of the run.

Tests that train a ResNet50 or start a process are marked `slow`; `make
test-fast` (`pytest -m "not slow"`) runs the others. A test is marked by
`@pytest.mark.slow`, or here when it uses a fixture that does such work:
one in SLOW_FIXTURES below, or in its module's own SLOW_FIXTURES."""

import gzip
import importlib.util
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fixtures that train a ResNet50 or start a process (see the docstring).
SLOW_FIXTURES = frozenset({"smoke_run", "smoke_flags"})


def pytest_collection_modifyitems(items):
  """Marks `slow` every test that uses a slow fixture, directly or not."""
  for item in items:
    slow = SLOW_FIXTURES | set(getattr(getattr(item, "module", None),
                                       "SLOW_FIXTURES", ()))
    if slow.intersection(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def fast_tests_start_no_python(request, monkeypatch):
  """Fails a test not marked `slow` that starts a program of this Python.

  The interpreter, saved_model_cli, tensorboard: each costs seconds of
  start-up and TensorFlow import, which the fast tier leaves out. Fixtures
  of a wider scope than the test are set up before this check; list those
  in SLOW_FIXTURES.
  """
  if request.node.get_closest_marker("slow"):
    return
  bin_dir = os.path.dirname(sys.executable)
  popen_init = subprocess.Popen.__init__

  def refuse_this_python(self, args, *rest, **kwargs):
    program = args if isinstance(args, (str, bytes, os.PathLike)) else args[0]
    if os.path.dirname(os.fsdecode(program)) == bin_dir:
      self._child_created = False  # What Popen.__del__ reads.
      raise AssertionError(
          f"{request.node.nodeid} starts {program}: mark it "
          "@pytest.mark.slow (or list its fixture in SLOW_FIXTURES).")
    popen_init(self, args, *rest, **kwargs)

  monkeypatch.setattr(subprocess.Popen, "__init__", refuse_this_python)


def load_tool(name):
  """tools/NAME.py as a module (tools/ is not a package); its flags are
  defined only when it runs as a script, so importing it defines none."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_idx(path, array, type_code=0x08):
  """A gzipped idx file as Fashion-MNIST's: magic, big-endian dimensions,
  bytes."""
  header = bytes([0, 0, type_code, array.ndim]) + struct.pack(
      f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def run_cli(*flags, timeout=600):
  """Runs `python -m tf_finetune.main` from the repository root."""
  return subprocess.run(
      [sys.executable, "-m", "tf_finetune.main", *flags], cwd=ROOT,
      capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """One real training run of configs/smoke.cfg through the command line.

  Returns:
    (workdir, data_dir).
  """
  base = tmp_path_factory.mktemp("smoke")
  workdir, data_dir = str(base / "work"), str(base / "data")
  result = run_cli("--flagfile=configs/smoke.cfg", f"--workdir={workdir}",
                   f"--data_dir={data_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, data_dir


@pytest.fixture
def smoke_flags(smoke_run):
  """The flags that point a command at the smoke run's workdir and data."""
  workdir, data_dir = smoke_run
  return ("--flagfile=configs/smoke.cfg", f"--workdir={workdir}",
          f"--data_dir={data_dir}")


def write_backbone_weights(path, image_size, seed):
  """Writes a ResNet50 backbone weights file to `path` whose BatchNorm
  statistics are not the trivial 0/1, so that 'bit-identical statistics'
  checks mean something; returns {variable path: value} of the file."""
  import keras  # Here: importing Keras is slow and most callers need none.
  keras.utils.set_random_seed(seed)
  source = keras.applications.ResNet50(include_top=False, weights=None,
                                       input_shape=(image_size, image_size, 3))
  rng = np.random.default_rng(seed)
  for layer in source.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      shape = layer.moving_mean.shape
      layer.moving_mean.assign(rng.uniform(-0.1, 0.1, shape))
      layer.moving_variance.assign(rng.uniform(0.5, 1.5, shape))
  source.save_weights(str(path))
  return {v.path: v.numpy().copy() for v in source.weights}


def another_value(config, name):
  """A value of `config`'s setting `name` other than its own, of the same
  type (another of its choices); None when it has no other choice."""
  value = getattr(config, name)
  choices = config.__dataclass_fields__[name].metadata["choices"]
  if choices is not None:
    others = [choice for choice in choices if choice != value]
    return others[-1] if others else None
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value - 1 if value > 1 else value + 1
  if isinstance(value, float):
    return value / 2 if value else 0.05
  if isinstance(value, tuple):
    return value + ("zoom",)
  return value + "x"

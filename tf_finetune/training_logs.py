"""What a training run logs under WORKDIR/logs/ and prints: training.csv
and TensorBoard on one epoch axis over both stages and every fit, and
Keras' progress lines numbered against the run's epochs.

A resumed run trims the CSV rows of the epochs it trains again and appends
to the rest, so the log keeps one row per epoch.
"""

import os
import shutil
import tempfile
import weakref

import keras

from tf_finetune import files


def create_logging_callbacks(workdir: str, append: bool = False):
  """TensorBoard and CSV logs under WORKDIR/logs/, one epoch axis for both
  stages (`train.fit_stages` continues them from fit to fit). `append`
  continues the CSV log of a resumed run (and its second fit) instead of
  starting a new one."""
  logs = os.path.join(workdir, "logs")
  files.makedirs(logs)
  csv_path = os.path.join(logs, "training.csv")
  # TensorBoard writes through tf.summary, which reaches any tf.io.gfile store.
  return [keras.callbacks.TensorBoard(logs, write_graph=False),
          keras.callbacks.CSVLogger(csv_path, append=append)
          if files.is_local(csv_path) else CopiedCSVLogger(csv_path, append)]


class CopiedCSVLogger(keras.callbacks.CSVLogger):
  """A CSVLogger for a non-local path: each `fit` logs to a local file that is
  copied to the path after every epoch.

  Keras 3.15's CSVLogger opens a non-local path as a `tf.io.gfile.GFile`,
  then fails in `on_train_end`, which reads `GFile.closed` (GFile has no
  such attribute).
  """

  def __init__(self, path: str, append: bool = False):
    super().__init__(path, append=append)
    self.target = path
    self._local_folder = None

  def on_train_begin(self, logs=None):
    self._local_folder = tempfile.mkdtemp(prefix="tf_finetune-csv-")
    # A fit that raises skips on_train_end; the folder then goes with the
    # logger, or at exit.
    weakref.finalize(self, shutil.rmtree, self._local_folder, True)
    self.filename = os.path.join(self._local_folder,
                                 os.path.basename(self.target))
    # Continues the target's rows (a resumed run has trimmed them there).
    if self.append and files.exists(self.target):
      with open(self.filename, "wb") as f:
        f.write(files.read_bytes(self.target))
    super().on_train_begin(logs)

  def on_epoch_end(self, epoch, logs=None):
    super().on_epoch_end(epoch, logs)  # Flushes the local file.
    with open(self.filename, "rb") as f:
      files.write_bytes_atomic(self.target, f.read())

  def on_train_end(self, logs=None):
    super().on_train_end(logs)
    shutil.rmtree(self._local_folder, ignore_errors=True)


def trim_csv_log(path: str, first_epoch: int) -> None:
  """Drops the rows of epochs >= `first_epoch` from a CSVLogger file.

  They were logged after the checkpoint being resumed from and are trained
  again, so the log keeps one row per epoch.
  """
  if not files.exists(path):
    return
  lines = files.read_text(path).splitlines()
  if not lines:
    return
  kept = [lines[0]] + [line for line in lines[1:]
                       if line and int(line.split(",", 1)[0]) < first_epoch]
  files.write_text_atomic(path, "\n".join(kept) + "\n")


class EpochProgress(keras.callbacks.ProgbarLogger):
  """Keras' progress lines, numbered against the run's total epochs: the
  fit that finishes an interrupted epoch would otherwise print 'Epoch 3/3'
  for the third of four epochs."""

  def __init__(self, total_epochs: int):
    super().__init__()
    self.total_epochs = total_epochs

  def set_params(self, params):
    super().set_params({**params, "epochs": self.total_epochs})

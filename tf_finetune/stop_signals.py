"""SIGTERM and SIGINT during training: "save a checkpoint, then stop".

`checkpoints.Checkpointer.catch_stop_signals` installs `StopSignals` around
the fits; the handler only records the signal, and the checkpointer saves at
the next step end and raises `StoppedBySignal`.
"""

import signal

from absl import logging

from tf_finetune.config import Preempted

# Signals that mean "save a checkpoint and stop": a scheduler's preemption
# or `kill` (SIGTERM), Ctrl-C in the terminal (SIGINT).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(Preempted):
  """A stop signal ended training after a checkpoint; rerunning resumes.

  Attributes:
    exit_code: 128 + the signal's number, the shell's code for a process
      ended by that signal (143 for SIGTERM, 130 for SIGINT): schedulers
      see an unfinished job and restart it.
  """

  def __init__(self, message: str, signal_number: int):
    super().__init__(message)
    self.exit_code = 128 + signal_number


class StopSignals:
  """Routes STOP_SIGNALS to a checkpointer's `stop_signal`; restores the
  previous handlers on exit.

  SIGINT is left alone when it is ignored on entry, as Python itself does:
  a shell starts background jobs that way so that Ctrl-C, meant for the
  foreground program, does not reach them.
  """

  def __init__(self, checkpointer):
    self.checkpointer = checkpointer
    self.previous = {}

  def __enter__(self):
    for number in STOP_SIGNALS:
      if number == signal.SIGINT and (
          signal.getsignal(number) == signal.SIG_IGN):
        continue
      try:
        self.previous[number] = signal.signal(number, self._handle)
      except ValueError:  # Not the main thread: signals cannot be caught.
        logging.warning("Not in the main thread: SIGTERM and SIGINT will "
                        "not checkpoint.")
        break
    return self

  def __exit__(self, *exc):
    for number, handler in self.previous.items():
      signal.signal(number, handler)
    return False

  def _handle(self, number, frame):
    del frame
    if self.checkpointer.stop_signal is None:
      self.checkpointer.stop_signal = number
      logging.warning("%s: saving a checkpoint after this step%s.",
                      signal.Signals(number).name,
                      " (press Ctrl-C again to stop at once, without it)"
                      if number == signal.SIGINT else "")
    elif number == signal.SIGINT:
      raise KeyboardInterrupt

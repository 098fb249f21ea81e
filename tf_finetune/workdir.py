"""The workdir check of a training run: resume the run whose checkpoints
are there, refuse another run's, or start afresh.

A run resumes only with the settings its checkpoints were written with,
apart from the resumable ones (`config.fingerprint`); `--fresh` deletes the
checkpoints instead. main.py checks before it rewrites flags.cfg, so a
refused run never replaces the flags of the run it protects.
"""

from typing import Optional

from absl import logging

from tf_finetune import config as config_lib
from tf_finetune import files
from tf_finetune.checkpoints import (TrainingState, checkpoint_dir,
                                     read_state, remove_checkpoints)
from tf_finetune.config import Config


def check_workdir(config: Config) -> Optional[TrainingState]:
  """Returns the state to resume from, or None for a fresh start.

  Raises:
    UserError: WORKDIR holds checkpoints of a run with other run-defining
      flags, and --fresh was not given.
  """
  if config.fresh:
    return None
  resume = read_state(config.workdir)
  if resume is None:
    return None
  config_lib.refuse_changed_flags(
      resume.fingerprint, config_lib.fingerprint(config),
      holder=f"--workdir={config.workdir!r} holds the checkpoints of a "
      "different run",
      remedy="Rerun with that run's flags (its flags.cfg) to resume it, "
      "choose another --workdir, or pass --fresh to delete its checkpoints "
      "and start over.")
  return resume


def prepare_workdir(config: Config) -> Optional[TrainingState]:
  """Like `check_workdir`, but --fresh also deletes the old checkpoints."""
  if config.fresh and files.isdir(checkpoint_dir(config.workdir)):
    logging.info("--fresh: deleting %s", checkpoint_dir(config.workdir))
    remove_checkpoints(config.workdir)
  return check_workdir(config)

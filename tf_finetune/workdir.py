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
                                     copy_checkpoint, read_state,
                                     remove_checkpoints)
from tf_finetune.config import Config, UserError


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


def adopt_shared_head(config: Config) -> Optional[TrainingState]:
  """With --shared_head, copies the stage-head checkpoint there into
  WORKDIR/checkpoints as this run's own, so the run resumes from it (stage
  finetune writes only into WORKDIR); None when there is none yet (this
  run trains stage head and writes it there).

  Raises:
    UserError: the checkpoint there is not at stage head's end, or its run
      differs from this one in a setting stage head depends on.
  """
  state = read_state(config.shared_head)
  if state is None:
    return None
  holder = f"--shared_head={config.shared_head!r} holds"
  config_lib.refuse_changed_flags(
      head_settings(state.fingerprint),
      head_settings(config_lib.fingerprint(config)),
      holder=f"{holder} the stage head of a run with other settings",
      remedy="Point --shared_head at a folder of its own.")
  if (state.epoch, state.step) != (config.head_epochs, 0):
    raise UserError(f"{holder} a checkpoint at epoch {state.epoch}, step "
                    f"{state.step}, not at stage head's end (epoch "
                    f"{config.head_epochs}); point --shared_head at a folder "
                    "of its own.")
  logging.info("Starting stage finetune from the stage head in %s.",
               config.shared_head)
  return copy_checkpoint(config.shared_head, config.workdir, state,
                         config_lib.fingerprint(config))


def head_settings(fingerprint) -> dict:
  """The part of a run's fingerprint stage head depends on."""
  return {name: value for name, value in fingerprint.items()
          if name not in config_lib.FINETUNE_SETTINGS}

"""Settings: each `Config` field is its flag, its flags.cfg line and its
place in (or out of) the run's fingerprint."""

import dataclasses

from absl import flags

from conftest import another_value
from tf_finetune import config as config_lib
from tf_finetune import main

# Values `another_value` cannot guess that `Config.validate` accepts.
VALID_VALUES = {"dataset": "folder:/images", "weights": "none",
                "search_unfreeze_blocks": "0:4",
                "search_finetune_learning_rate": "1e-5:1e-3",
                "search_head_learning_rate": "1e-4:1e-2",
                "search_dropout": "0.1:0.5",
                "search_finetune_epochs": "5:20",
                "export_formats": ("saved_model", "tflite")}


def parse_flags(*argv):
  """A Config from a command line, through flags defined as main.py's."""
  flag_values = flags.FlagValues()
  main.define_flags(flag_values)
  flag_values(["tf-finetune", *argv])
  return main.config_from_flags(flag_values)


def test_every_setting_is_a_flag_with_help_and_the_same_default():
  for field in dataclasses.fields(config_lib.Config):
    # absl fills an empty help with "(no help available)" and puts an enum's
    # choices first: compare the text.
    assert field.metadata["help"].strip(), field.name
    assert main.FLAGS[field.name].help.endswith(field.metadata["help"])
  assert parse_flags("--workdir=w") == config_lib.Config(workdir="w")


def test_flags_cfg_round_trips_every_setting(tmp_path):
  defaults = config_lib.Config(workdir=str(tmp_path))
  changed = {}
  for field in dataclasses.fields(defaults):
    value = VALID_VALUES.get(field.name,
                             another_value(defaults, field.name))
    if (field.name != "workdir" and field.metadata["recorded"]
        and value is not None):
      changed[field.name] = value
  varied = dataclasses.replace(defaults, **changed).validate()
  for config in (defaults, varied):
    path = tmp_path / "flags.cfg"
    path.write_text(config_lib.to_flagfile(config))
    assert parse_flags(f"--flagfile={path}") == config

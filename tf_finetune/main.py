"""Fine-tunes a pretrained ResNet50 image classifier in two stages.

Usage: tf-finetune --flagfile=configs/base.cfg --dataset=folder:DIR
  --workdir=DIR [--mode=train|evaluate|export|predict|tune] [flags]
(or python -m tf_finetune.main with the same flags). Flags after --flagfile
override it. --helpfull also lists the flags of absl and TensorFlow.
"""

# Kept short on purpose: this module defines the flags, turns them into a
# validated `Config`, and hands it to the module that does the job. No other
# module reads FLAGS.

import dataclasses
import logging as pylogging
import os
import sys

# TensorFlow's C++ start-up chatter hides our own messages; users can set it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from tf_finetune import config as config_lib  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines one flag per `Config` field, from the field: its type, default,
  help and choices (config.setting)."""
  for field in dataclasses.fields(config_lib.Config):
    name, meta = field.name, field.metadata
    default = None if field.default is dataclasses.MISSING else field.default
    args = dict(name=name, default=default, help=meta["help"],
                flag_values=flag_values)
    if meta["choices"] is not None:
      flags.DEFINE_enum(enum_values=meta["choices"],
                        case_sensitive=meta["case_sensitive"], **args)
    elif field.type is bool:
      flags.DEFINE_bool(**args)
    elif field.type is int:
      flags.DEFINE_integer(**args)
    elif field.type is float:
      flags.DEFINE_float(**args)
    elif field.type is str:
      flags.DEFINE_string(**args)
    else:  # A tuple of names, parsed in config_from_flags.
      flags.DEFINE_string(**{**args, "default": ",".join(default)})
  # Every mode needs it: train and tune write there, evaluate and export read
  # model.keras from it, predict writes predictions.json there. Checked while
  # the flags are parsed, so the message comes before anything is loaded.
  flags.register_validator(
      "workdir", bool,
      message="--workdir is required: the folder a training run writes to "
      "and --mode=evaluate, export and predict read from.",
      flag_values=flag_values)


define_flags()


def config_from_flags(
    flag_values: flags.FlagValues = FLAGS) -> config_lib.Config:
  values = {field.name: flag_values[field.name].value
            for field in dataclasses.fields(config_lib.Config)}
  values["augment"] = config_lib.parse_augment(flag_values.augment)
  values["export_formats"] = config_lib.parse_export_formats(
      flag_values.export_formats)
  return config_lib.Config(**values).validate()


def main(argv):
  # TensorFlow's own INFO lines (e.g. every SavedModel input renamed) drown
  # the run's progress; warnings still show.
  pylogging.getLogger("tensorflow").setLevel(pylogging.WARNING)
  if len(argv) > 1:
    print(f"tf_finetune: error: unexpected arguments {argv[1:]}: every "
          "setting is a flag, --name=value.", file=sys.stderr)
    return config_lib.USER_ERROR_EXIT_CODE
  try:
    config = config_from_flags()
    from tf_finetune import distribute, train  # Heavy: after validation.
    if config.mode == "train":
      # In a multi-worker run only the chief writes into the workdir.
      chief = distribute.is_chief(config.strategy)
      if chief:
        claim_workdir(config)
      result = train.run_training(config)
      print(f"val_accuracy: {result['val_accuracy']:.4f}")
      if result.get("val_balanced_accuracy") is not None:
        print(f"val_balanced_accuracy: {result['val_balanced_accuracy']:.4f}")
      if chief:
        print(f"report: {os.path.join(config.workdir, 'report.json')}")
        print(f"export: {result['export_path'] or 'none (--noexport)'}")
    elif config.mode == "evaluate":
      from tf_finetune import evaluate
      result = evaluate.run_evaluation(config)
      print(f"{result['split']} accuracy: {result['accuracy']:.4f} "
            f"({result['runtime']})")
      if "litert" in result:
        print(format_litert_comparison(result["litert"]))
      print(f"evaluation: {os.path.join(config.workdir, 'evaluation.json')}")
    elif config.mode == "export":
      from tf_finetune import export
      print(f"export: {export.run_export(config)}")
    elif config.mode == "predict":
      from tf_finetune import predict
      print_predictions(predict.run_prediction(config), config.workdir)
    elif config.mode == "tune":
      from tf_finetune import tuning  # pylint: disable=g-import-not-at-top
      result = tuning.run_search(config)
      if result is not None:  # None: a worker; the chief reports.
        print(tuning.format_summary(result))
        print(f"tuning report: {result['report_path']}")
        print(f"best config: {result['best_config']} (train it: python -m "
              f"tf_finetune.main --flagfile={result['best_config']})")
  except config_lib.UserError as e:
    print(f"tf_finetune: error: {e}", file=sys.stderr)
    diverged = isinstance(e, config_lib.TrainingDiverged)
    return (config_lib.DIVERGED_EXIT_CODE if diverged
            else config_lib.USER_ERROR_EXIT_CODE)
  except config_lib.Preempted as e:
    print(f"tf_finetune: {e}", file=sys.stderr)
    return getattr(e, "exit_code", config_lib.PREEMPTED_EXIT_CODE)
  except KeyboardInterrupt:  # Ctrl-C outside training, or twice inside.
    print("tf_finetune: stopped by SIGINT.", file=sys.stderr)
    return config_lib.INTERRUPTED_EXIT_CODE
  return 0


def claim_workdir(config: config_lib.Config) -> None:
  """Refuses a workdir holding another run's checkpoints, then writes this
  run's flags to WORKDIR/flags.cfg.

  Raises:
    UserError: the workdir holds another run's checkpoints.
  """
  from tf_finetune import files  # Heavy: after validation.
  from tf_finetune import workdir as workdir_lib
  # Before flags.cfg is rewritten: a refused run must not replace the flags
  # of the run whose checkpoints are there.
  workdir_lib.check_workdir(config)
  files.write_text_atomic(os.path.join(config.workdir, "flags.cfg"),
                          config_lib.to_flagfile(config))


def format_litert_comparison(comparison):
  """The LiteRT models against their SavedModel, a few lines for stdout."""
  sizes, latency = comparison["size_bytes"], comparison["latency_ms"]
  return "\n".join([
      f"litert: {comparison['version']}",
      f"  tflite: {sizes['tflite'] / 2**20:.1f} MiB, largest probability "
      f"difference to the SavedModel "
      f"{comparison['float_max_abs_difference']:.2e}, top-1 agreement "
      f"{comparison['float_top1_agreement']:.2%}",
      f"  tflite_int8: {sizes['tflite_int8'] / 2**20:.1f} MiB, top-1 "
      f"agreement with the SavedModel {comparison['int8_top1_agreement']:.2%}"
      f", largest probability difference "
      f"{comparison['int8_max_abs_difference']:.2e}",
      "  latency (" + comparison["latency"] + "): " + ", ".join(
          f"{name} {ms:.1f} ms" for name, ms in latency.items())])


def print_predictions(result, workdir):
  """Summary on stdout; each skipped file on stderr, as it needs attention."""
  for skipped in result["skipped_files"]:
    print(f"tf_finetune: skipped {skipped['path']}: {skipped['reason']}",
          file=sys.stderr)
  print(f"predicted: {len(result['predictions'])} files with "
        f"{result['export_path']}, skipped: {len(result['skipped_files'])}")
  print(f"predictions: {os.path.join(workdir, 'predictions.json')}")


def parse_flags(argv):
  """absl's flag parsing, its errors reported as the package reports bad input.

  Args:
    argv: the command line, program name first.

  Returns:
    The arguments that are not flags, program name first.
  """
  try:
    return FLAGS(argv)
  except flags.Error as e:
    # absl prints a "FATAL" line and exits 1; bad input exits 2 here.
    message = " ".join(str(e).split()).rstrip(".")
    print(f"tf_finetune: error: {message}. --help lists the flags.",
          file=sys.stderr)
    sys.exit(config_lib.USER_ERROR_EXIT_CODE)


def declare_flags_of_main_module():
  """Makes this module's flags the key flags of the program being run.

  absl's --help lists the key flags of the module named by sys.argv[0]. Under
  `python -m tf_finetune.main` that is this file; under the `tf-finetune`
  console script it is the script, which defines no flags. Declaring them for
  sys.argv[0] too gives both the same list (a no-op in the first case).
  """
  for flag in FLAGS.get_key_flags_for_module(__name__):
    FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  # --help also prints __main__'s docstring; the console script has none.
  main_module = sys.modules["__main__"]
  if not getattr(main_module, "__doc__", None):
    main_module.__doc__ = __doc__


def run():
  """Entry point of `tf-finetune` and of `python -m tf_finetune.main`."""
  declare_flags_of_main_module()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()

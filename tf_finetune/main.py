"""Fine-tunes a pretrained ResNet50 image classifier in two stages.

Usage: tf-finetune --flagfile=configs/base.cfg --dataset=folder:DIR
  --workdir=DIR [--mode=train|evaluate|export|predict|tune] [flags]
(or python -m tf_finetune.main with the same flags). Flags after --flagfile
override it. --helpfull also lists the flags of absl and TensorFlow.
"""

# Kept short on purpose: this module defines the flags, turns them into a
# validated `Config`, and hands it to the module that does the job. No other
# module reads FLAGS.

import logging as pylogging
import os
import signal
import sys

# TensorFlow's C++ start-up chatter hides our own messages; users can set it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from tf_finetune import config as config_lib  # noqa: E402

FLAGS = flags.FLAGS
# 128 + the signal's number, the shell's code for a process that signal
# ended: job schedulers then see an unfinished run and restart it, and the
# restart resumes. SIGTERM: 143; SIGINT (Ctrl-C): 130.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
_D = config_lib.Config  # Defaults live in one place: the Config dataclass.

flags.DEFINE_string("workdir", None, "Output folder (required).")
# Every mode needs it: train and tune write there, evaluate and export read
# model.keras from it, predict writes predictions.json there. Checked while
# the flags are parsed, so the message comes before anything is loaded.
flags.register_validator(
    "workdir", bool,
    message="--workdir is required: the folder a training run writes to and "
    "--mode=evaluate, export and predict read from.")
flags.DEFINE_enum("mode", _D.mode, config_lib.MODES, "Job to run.")
flags.DEFINE_string("dataset", _D.dataset,
                    "demo | folder:DIR | tfds:NAME[:VERSION].")
flags.DEFINE_string("data_dir", _D.data_dir,
                    "TFDS data folder; also where the demo dataset is written.")
flags.DEFINE_integer("image_size", _D.image_size, "Square input side, >= 32.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size.")
flags.DEFINE_float("val_fraction", _D.val_fraction,
                   "Validation share when the source has no such split.")
flags.DEFINE_float("test_fraction", _D.test_fraction,
                   "Test share when the source has no such split.")
flags.DEFINE_string("weights", _D.weights,
                    "imagenet | none | PATH to a ResNet50(include_top=False) "
                    ".weights.h5 file.")
flags.DEFINE_enum("backbone", _D.backbone, config_lib.BACKBONES, "Backbone.")
flags.DEFINE_integer("head_epochs", _D.head_epochs, "Epochs of stage head.")
flags.DEFINE_float("head_learning_rate", _D.head_learning_rate,
                   "Learning rate of stage head.")
flags.DEFINE_integer("finetune_epochs", _D.finetune_epochs,
                     "Epochs of stage finetune.")
flags.DEFINE_float("finetune_learning_rate", _D.finetune_learning_rate,
                   "Learning rate of stage finetune.")
flags.DEFINE_integer("unfreeze_blocks", _D.unfreeze_blocks,
                     "Residual blocks unfrozen in stage finetune, from the "
                     "top (0-16).")
flags.DEFINE_enum("lr_schedule", _D.lr_schedule, config_lib.LR_SCHEDULES,
                  "Learning rate within each stage: cosine decays it to zero "
                  "over the stage; constant keeps it.")
flags.DEFINE_float("warmup_fraction", _D.warmup_fraction,
                   "Share of stage finetune's steps over which its learning "
                   "rate rises linearly from zero (cosine schedule).")
flags.DEFINE_float("dropout", _D.dropout, "Dropout before the head.")
flags.DEFINE_float("label_smoothing", _D.label_smoothing, "Label smoothing.")
flags.DEFINE_enum("class_weighting", _D.class_weighting,
                  config_lib.CLASS_WEIGHTINGS,
                  "auto: weigh training examples by inverse class frequency, "
                  "and select on balanced validation accuracy, when the "
                  "largest class has at least 2x the smallest's images; none: "
                  "unweighted.")
flags.DEFINE_string("augment", ",".join(_D.augment),
                    "Comma list of augmentations, or none.")
flags.DEFINE_enum("strategy", _D.strategy, config_lib.STRATEGIES,
                  "tf.distribute strategy.")
flags.DEFINE_integer("virtual_cpu_devices", _D.virtual_cpu_devices,
                     "Split the CPU into N logical devices (0: don't).")
flags.DEFINE_enum("jit_compile", _D.jit_compile, config_lib.JIT_COMPILE_CHOICES,
                  "XLA-compile the train step. auto: on with GPUs, off on "
                  "CPUs (compiling costs more than it saves there).",
                  case_sensitive=False)
flags.DEFINE_integer("seed", _D.seed, "Seed for splits, shuffling, "
                     "augmentation and initialisation.")
flags.DEFINE_string("export_dir", _D.export_dir,
                    "SavedModel versions go here; default WORKDIR/export.")
flags.DEFINE_integer("top_k", _D.top_k, "Classes returned by the export.")
flags.DEFINE_string("inputs", _D.inputs,
                    "--mode=predict: an image file or a folder of images.")
flags.DEFINE_integer("save_every_steps", _D.save_every_steps,
                     "Also checkpoint every N training steps (0: at the end "
                     "of each epoch only).")
flags.DEFINE_bool("fresh", _D.fresh, "Delete WORKDIR/checkpoints and train "
                  "from the start instead of resuming.")
# Mode "tune": a search_* flag left empty keeps its training flag fixed.
for _name in config_lib.SEARCHABLE:
  flags.DEFINE_string(f"search_{_name}", getattr(_D, f"search_{_name}"),
                      f"MIN:MAX range of --{_name} to search (mode tune).")
flags.DEFINE_enum("tuner", _D.tuner, config_lib.TUNERS, "Search algorithm.")
flags.DEFINE_integer("max_trials", _D.max_trials, "Trials of the search.")
flags.DEFINE_integer("max_epochs", _D.max_epochs,
                     "Hyperband's largest epoch budget per trial (0: "
                     "--head_epochs plus --finetune_epochs).")
flags.DEFINE_integer("hyperband_factor", _D.hyperband_factor,
                     "Hyperband's reduction factor between rounds.")
flags.DEFINE_enum("objective", _D.objective, config_lib.OBJECTIVES,
                  "Validation metric the run keeps its best epoch by (over "
                  "both stages), and that the search optimises.")
flags.DEFINE_integer("early_stopping_patience", _D.early_stopping_patience,
                     "Stop a trial after this many stage-finetune epochs "
                     "without a better objective (0: off).")
flags.DEFINE_integer("executions_per_trial", _D.executions_per_trial,
                     "Trainings per trial, from different initialisations; "
                     "the score is their mean.")
flags.DEFINE_bool("overwrite_search", _D.overwrite_search,
                  "Start the search in WORKDIR/tuner/ afresh instead of "
                  "resuming it.")
flags.DEFINE_enum("mixed_precision", _D.mixed_precision,
                  config_lib.MIXED_PRECISION_CHOICES,
                  "Keras dtype policy. auto: mixed_float16 on GPUs of compute "
                  "capability >= 7, else float32.")
flags.DEFINE_bool("cache_features", _D.cache_features,
                  "Stage head trains on backbone features computed once per "
                  "view of each image instead of running the frozen backbone "
                  "in every epoch.")
flags.DEFINE_integer("feature_views", _D.feature_views,
                     "Views per training image in the feature cache: 1 is the "
                     "un-augmented images (--augment then applies in stage "
                     "finetune only); K >= 2 are K augmented views, head "
                     "epoch e trains on view e mod K.")
flags.DEFINE_integer("cache_memory_mb", _D.cache_memory_mb,
                     "Feature cache held in memory up to this size; the rest "
                     "goes to files under WORKDIR/feature_cache/.")


def config_from_flags() -> config_lib.Config:
  values = {name: FLAGS[name].value for name in config_lib.Config.__annotations__
            if name in FLAGS}
  values["augment"] = config_lib.parse_augment(FLAGS.augment)
  return config_lib.Config(**values).validate()


def main(argv):
  # TensorFlow's own INFO lines (e.g. every SavedModel input renamed) drown
  # the run's progress; warnings still show.
  pylogging.getLogger("tensorflow").setLevel(pylogging.WARNING)
  if len(argv) > 1:
    print(f"tf_finetune: error: unexpected arguments {argv[1:]}: every "
          "setting is a flag, --name=value.", file=sys.stderr)
    return 2
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
        print(f"export: {result['export_path']}")
    elif config.mode == "evaluate":
      from tf_finetune import evaluate
      result = evaluate.run_evaluation(config)
      print(f"{result['split']} accuracy: {result['accuracy']:.4f}")
      print(f"evaluation: {os.path.join(config.workdir, 'evaluation.json')}")
    elif config.mode == "export":
      print(f"export: {train.run_export(config)}")
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
    return 2
  except config_lib.Preempted as e:
    print(f"tf_finetune: {e}", file=sys.stderr)
    return getattr(e, "exit_code", PREEMPTED_EXIT_CODE)
  except KeyboardInterrupt:  # Ctrl-C outside training, or twice inside.
    print("tf_finetune: stopped by SIGINT.", file=sys.stderr)
    return INTERRUPTED_EXIT_CODE
  return 0


def claim_workdir(config: config_lib.Config) -> None:
  """Refuses a workdir holding another run's checkpoints, then writes this
  run's flags to WORKDIR/flags.cfg.

  Raises:
    UserError: the workdir holds another run's checkpoints.
  """
  from tf_finetune import checkpoints, files  # Heavy: after validation.
  # Before flags.cfg is rewritten: a refused run must not replace the flags
  # of the run whose checkpoints are there.
  checkpoints.check_workdir(config)
  files.write_text_atomic(os.path.join(config.workdir, "flags.cfg"),
                          config_lib.to_flagfile(config))


def print_predictions(result, workdir):
  """Summary on stdout; each skipped file on stderr, as it needs attention."""
  for skipped in result["skipped_files"]:
    print(f"tf_finetune: skipped {skipped['file']}: {skipped['reason']}",
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
    sys.exit(2)


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

"""Calibration of trained runs: validation and test ECE and NLL before and
after the temperature `--calibrate` would fold in.

Reads each WORKDIR's flags.cfg and model.keras (a model trained without
calibration, or with `--nocalibrate`), fits the temperature on the
validation split as training does (`calibration.calibrate_model`: folded
only when significantly better than none), and prints one row per run,
before -> after, on both splits. Accuracy is unchanged by construction.

  python tools/measure_calibration.py WORKDIR [WORKDIR ...]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from tf_finetune import calibration, data, main, saved_models  # noqa: E402


def config_of(workdir: str):
  """The run's Config, from its flags.cfg."""
  flag_values = flags.FlagValues()
  main.define_flags(flag_values)
  flag_values(["measure_calibration",
               f"--flagfile={os.path.join(workdir, 'flags.cfg')}",
               f"--workdir={workdir}"])
  return main.config_from_flags(flag_values)


def measure(workdir: str) -> dict:
  """The calibration record of one run, with the test split's figures."""
  config = config_of(workdir)
  model = saved_models.load_trained_model(workdir)
  datasets = data.create_datasets(config)
  test_logits, test_labels = calibration.predict_logits(model, datasets.test)
  record = calibration.calibrate_model(model, datasets.val)
  temperature = record["temperature"]
  record["test"] = {
      "before": calibration.summarize(calibration.softmax(test_logits),
                                      test_labels),
      "after": calibration.summarize(
          calibration.softmax(test_logits, temperature), test_labels)}
  return record


def row(workdir: str, record: dict) -> str:
  def pair(split, key):
    return (f"{split['before'][key]:.4f} -> {split['after'][key]:.4f}")
  return (f"| {workdir} | {record['fitted_temperature']:.3f} | "
          f"{record['p_value']:.3g} | {record['temperature']:.3f} | "
          f"{pair(record, 'ece')} | {pair(record, 'nll')} | "
          f"{pair(record['test'], 'ece')} | {pair(record['test'], 'nll')} | "
          f"{record['test']['after']['accuracy']:.4f} |")


def run(workdirs) -> None:
  print("| run | fitted T | p | folded T | val ECE | val NLL | test ECE | "
        "test NLL | test accuracy |")
  print("| --- | ---: | ---: | ---: | --- | --- | --- | --- | ---: |")
  for workdir in workdirs:
    print(row(workdir, measure(workdir)), flush=True)


if __name__ == "__main__":
  run(sys.argv[1:])

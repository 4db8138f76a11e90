"""Quick versions of the examples, run as a user would run them."""

import importlib.util
import pathlib
import re

import numpy as np
import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_digits_trains_exports_and_serves(tmp_path, capsys):
    example = _load("train_digits")
    export_dir = tmp_path / "served"
    accuracy = example.main(["--epochs", "3", "--export-dir", str(export_dir)])
    out = capsys.readouterr().out
    assert accuracy > 0.85, out
    loss_first, loss_last = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert loss_last < 0.5 * loss_first
    # The export is a plain SavedModel: plain TensorFlow serves it.
    served = tf.saved_model.load(str(export_dir))
    x = np.random.default_rng(1).uniform(size=(5, 64)).astype("float32")
    assert served.serve(tf.constant(x)).shape == (5, 10)


def test_readme_quickstart_runs():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    assert namespace["dl_dy0"].shape == (2,)
    assert namespace["dl_dts"].shape == (3,)
    assert int(namespace["sol"].status) == 0

"""The README's and the guides' code blocks run as a reader would paste them: each file's
```python blocks in order, in one namespace, in a fresh working directory."""

import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(path):
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


def run_blocks(path):
    namespace = {}
    for i, code in enumerate(code_blocks(path), 1):
        exec(compile(code, f"{path.relative_to(ROOT)}, code block {i}", "exec"), namespace)
    return namespace


def check_readme(ns):
    assert ns["dl_dy0"].shape == (2,) and ns["dl_dts"].shape == (3,)
    assert int(ns["sol"].status) == 0
    # The exported model serves with TensorFlow alone what the model predicts.
    served = tf.saved_model.load("served")
    x = ns["x"][:8]
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(),
                               ns["model"].predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def check_keras(ns):
    loss = ns["history"].history["loss"]
    assert loss[-1] < loss[0]
    assert ns["predictions"].shape == (16, 5, 1)
    assert np.all(np.isfinite(ns["cde_history"].history["loss"]))
    assert ns["h"].shape == (16, 8) and np.all(np.isfinite(ns["h"]))


def check_gradients(ns):
    assert ns["ys"].shape == (11, 8, 4) and np.isfinite(ns["ys"].numpy()).all()


def check_solving(ns):
    assert int(ns["sol"].status) == 0
    plain, jumped = ns["plain"].stats, ns["jumped"].stats
    assert int(jumped.num_rejected) < 0.1 * int(plain.num_rejected)
    assert int(ns["floored"].stats.num_forced) >= 1
    assert ns["grad"].norm == "seminorm"
    explicit, implicit = ns["explicit"], ns["implicit"]
    assert int(explicit.status) == int(ns["tfaca"].Status.MAX_STEPS_REACHED)
    assert int(implicit.status) == 0 and int(implicit.stats.num_steps) < 100
    np.testing.assert_allclose(implicit.ys[-1].numpy(), [0.7158271, 9.185535e-06, 0.2841637],
                               rtol=1e-5)


CHECKS = {"README.md": check_readme, "keras.md": check_keras,
          "gradients.md": check_gradients, "solving.md": check_solving}


def test_every_guide_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for path in DOCS[1:]:
        assert f"](docs/{path.name})" in readme, path.name


@pytest.mark.parametrize("path", [p for p in DOCS if code_blocks(p)], ids=lambda p: p.name)
def test_code_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_blocks(path)
    if path.name in CHECKS:
        CHECKS[path.name](namespace)


def test_every_file_with_code_is_checked():
    """A new guide with code gets its own checks above, beyond running."""
    assert {p.name for p in DOCS if code_blocks(p)} == set(CHECKS)

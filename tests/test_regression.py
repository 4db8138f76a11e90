"""Regression against recorded numbers: outputs, gradients and step statistics of tfaca at
commit 19531ba, in float64, to 1e-12. (First recorded at 30fce51, main before issue 26's
rewrite, which reproduced them; re-recorded at 19531ba, issue 29, where an accepted step
stopped shrinking the next, as TorchDiffEqPack, torchdiffeq and diffrax: steps, outputs
and gradients of the adaptive configurations moved by the error control's tolerance.)

`tests/reference/today.npz` holds, for each configuration of a matrix (times: shared 2,
6 increasing, 6 decreasing, per-row with padding; dense and landing outputs; shared and
per-sample steps; gradients aca, naive, adjoint, `ACAGradient(checkpoints=2)`, mali;
Dopri5, Tsit5, Bosh3, RK4 and ALF; eagerly, in a `tf.function` with the loops compiled
or not, and under XLA), the problem's inputs, `ys`, the gradients of a loss with
non-uniform cotangents with respect to `y0`, `ts` and the field's variables `W` and `b`,
`Solution.stats`, `status`, `t_final` and the adjoint's `backward_stats`. It was written
by `tests/reference/make_reference.py` from commit 19531ba (its metadata, `__meta__`,
records the full hash, the versions, the configurations tfaca refused there and the
ones that failed). Each test here reruns one recorded configuration with the tfaca being
tested and requires every array to agree to `1e-12 * max(1, max|reference|)` and the
statistics to be equal. (Not bitwise: at the recording commit itself, naive gradients in a
`tf.function` vary by ~1e-16 relative from one process to the next, TensorFlow's
accumulation order.)

The file is regenerated only deliberately, by running `make_reference.py` (and updating
`REFERENCE_COMMIT` and this docstring), when a change of the numbers is intended and
understood; never to make this test pass.
"""

import importlib.util
import pathlib

import numpy as np
import pytest

REFERENCE_DIR = pathlib.Path(__file__).resolve().parent / "reference"
REFERENCE_FILE = REFERENCE_DIR / "today.npz"
REFERENCE_COMMIT = "19531ba"
RTOL = 1e-12


def _import_make_reference():
    spec = importlib.util.spec_from_file_location(
        "make_reference", REFERENCE_DIR / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_reference = _import_make_reference()
META, INPUTS, RECORDS = make_reference.load(REFERENCE_FILE)

# Eager Runge-Kutta configurations take 0.2-3 s each on 2 cores, Bosh3's (third order,
# more steps) 4-11 s. Each compiled one traces (and compiles) anew, 2-11 s, and ALF takes
# over 800 steps at rtol 1e-6 (6-15 s eagerly). The quick suite runs the eager
# Runge-Kutta ones but Bosh3's (whose order and steps test_solvers checks there) and one
# in a `tf.function` (whose loops `jit_compile="auto"` compiles); the slow suite all of
# them (stop 45: the quick suite at CI's limit).
QUICK_COMPILED = "t6-dense-shared-aca-dopri5-function"


def _marks(key):
    spec = META["configs"][key]["spec"]
    if spec["mode"] == "eager":
        slow = spec["method"] in ("alf", "bosh3")
    else:
        slow = key != QUICK_COMPILED
    return (pytest.mark.slow,) if slow else ()


def _close(key, name, actual, expected):
    assert actual.shape == expected.shape, (
        f"{key} {name}: shape {actual.shape}, reference {expected.shape}")
    if expected.size == 0:
        return
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan, err_msg=f"{key} {name}: NaN pattern")
    scale = max(1.0, float(np.max(np.abs(np.where(nan, 0.0, expected)))))
    err = float(np.max(np.abs(np.where(nan, 0.0, actual - expected))))
    assert err <= RTOL * scale, (
        f"{key} {name}: max|actual - reference| = {err:.3g} > {RTOL:g} * {scale:.3g}")


def test_reference_header():
    """The file names the commit this module says it was made from, a clean one."""
    assert META["commit"].startswith(REFERENCE_COMMIT), META["commit"]
    assert not META["tfaca_dirty"]
    assert META["dtype"] == "float64" and META["rtol"] == 1e-6 and META["atol"] == 1e-8


def test_reference_covers_the_matrix():
    """Every configuration make_reference.py lists is in the file, skipped or failed: the
    script and the file have not drifted apart."""
    listed = {make_reference.key_of(s) for s in make_reference.configurations()}
    stored = set(META["configs"]) | set(META["skipped"]) | set(META["failed"])
    assert listed == stored
    assert set(RECORDS) == set(META["configs"])
    for key, info in META["configs"].items():
        assert make_reference.key_of(info["spec"]) == key


@pytest.mark.parametrize(
    "key", [pytest.param(key, marks=_marks(key), id=key) for key in sorted(META["configs"])])
def test_matches_reference(key):
    spec = META["configs"][key]["spec"]
    expected = RECORDS[key]
    actual = make_reference.run(spec, INPUTS)

    gradients = set(make_reference.GRADS)
    assert set(actual) & gradients == set(expected) & gradients, (
        f"{key}: gradients {sorted(set(actual) & gradients)} (None for the others), "
        f"reference {sorted(set(expected) & gradients)}")
    missing = set(expected) - set(actual)
    assert not missing, f"{key}: not computed: {sorted(missing)}"
    counts = [name for name in expected if "stats/" in name or name == "status"]
    for name in counts:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=f"{key} {name}")
    for name in sorted(set(expected) - set(counts)):
        _close(key, name, actual[name], expected[name])


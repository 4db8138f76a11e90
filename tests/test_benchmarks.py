"""The benchmark's own correctness: its problems and how its report judges the targets.

The peers are not installed in the test environment; these tests use only the NumPy
problem definitions, the TensorFlow vector fields and the report code.
"""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import problems  # noqa: E402
import run  # noqa: E402
import runners  # noqa: E402


def test_threebody_vector_field_matches_numpy_reference():
    p = problems.make("threebody")
    masses = p["weights"][0][1].astype(np.float64)
    rng = np.random.default_rng(0)
    for y in [p["y0"].astype(np.float64), rng.standard_normal((4, 18))]:
        f = runners._tf_vf(tf, "threebody", [tf.constant(masses)])
        np.testing.assert_allclose(
            f(tf.constant(y)).numpy(), problems.threebody_numpy(y, masses), rtol=1e-12
        )


@pytest.mark.parametrize("name", ["mlp", "conv", "threebody"])
def test_problems_are_seeded_float32(name):
    a, b = problems.make(name), problems.make(name)
    assert a["y0"].dtype == np.float32
    np.testing.assert_array_equal(a["y0"], b["y0"])
    for (_, wa), (_, wb) in zip(a["weights"], b["weights"]):
        assert wa.dtype == np.float32
        np.testing.assert_array_equal(wa, wb)


def _entry(fwdbwd_s, err=1e-3, nfe_fwd=100, nfe_bwd=96, t_f=1e-4, t_vjp=3e-4, **kw):
    return dict(fwd_s=fwdbwd_s / 3, fwdbwd_s=fwdbwd_s, err_grad_y0=err, err_grad_w=err,
                nfe_fwd=nfe_fwd, nfe_bwd=nfe_bwd, t_f_s=t_f, t_vjp_s=t_vjp, vjp_rule="bwd",
                steps=60, **kw)


def test_targets_take_the_faster_mode_and_judge_each_target():
    results = {
        ("tfaca-aca", "mlp"): _entry(0.040, mem_fwdbwd_mb=2.0),
        ("tfaca-aca-xla", "mlp"): _entry(0.020),
        ("tfaca-naive", "mlp"): _entry(0.050, mem_fwdbwd_mb=20.0),
        ("diffrax-recursive", "mlp"): _entry(0.030, err=2e-3),
        ("tdep-odesolve", "mlp"): _entry(0.060, err=5e-4),
        ("tfaca-aca-tight", "mlp"): _entry(0.050, err=4e-4),
    }
    lines = run._targets(results, ["mlp"]).splitlines()
    diffrax = next(x for x in lines if "diffrax" in x)
    assert "= 0.67 with ACA, tf.function(jit_compile=True)" in diffrax and "PASS" in diffrax
    tdep = next(x for x in lines if "time ACA / TorchDiffEqPack" in x)
    assert "= 0.33" in tdep and "MISS" in tdep
    # A missed speed target states the zero-overhead floor: 100*1e-4 + 96*3e-4 = 38.8 ms.
    floor = lines[lines.index(tdep) + 1]
    assert "38.8 ms = 0.65 × the peer" in floor
    grad = next(x for x in lines if "gradient error" in x)
    assert grad.endswith("MISS")  # TorchDiffEqPack's 5e-4 beats tfaca's 1e-3
    detail = lines[lines.index(grad) + 1]
    # ... but not at equal time: the most accurate tfaca run within the peer's 60 ms.
    assert "TorchDiffEqPack" in detail
    assert "in no more time, tfaca ACA, tf.function, rtol/3 atol/3: 4.0e-04 / 4.0e-04" in detail
    assert detail.endswith("(at equal time: PASS)")
    memory = next(x for x in lines if "peak memory" in x)
    assert "= 0.100" in memory and "PASS" in memory


def test_gradient_error_target_passes_when_no_peer_is_better():
    results = {
        ("tfaca-aca", "conv"): _entry(0.5, err=1e-3),
        ("diffrax-recursive", "conv"): _entry(1.0, err=1e-3),
        ("tfp", "conv"): _entry(1.0, err=2e-3),
    }
    lines = run._targets(results, ["conv"]).splitlines()
    grad = next(x for x in lines if "gradient error" in x)
    assert "any of 2 peer entries" in grad and grad.endswith("PASS")


def test_default_mode_targets_are_judged_against_xla_diffrax_and_the_uncompiled_loops():
    results = {
        ("tfaca-aca", "mlp"): _entry(0.046),
        ("tfaca-aca-xla", "mlp"): _entry(0.040),
        ("diffrax-recursive", "mlp"): _entry(0.060),
        ("tfaca-aca", "conv"): _entry(1.15),
        ("tfaca-aca-nojit", "conv"): _entry(1.0),
        ("diffrax-recursive", "conv"): _entry(50.0),
        ("tfaca-aca", "threebody"): _entry(0.0015),
        ("tfaca-aca-xla", "threebody"): _entry(0.001),
    }
    lines = run._targets_default_mode(results, ["mlp", "conv", "threebody"]).splitlines()
    assert any("mlp" in x and "jit_compile=True" in x and "= 1.15 (target ≤ 1.2: PASS)" in x
               for x in lines)
    assert any("mlp" in x and "diffrax" in x and "= 0.77 (target ≤ 1: PASS)" in x for x in lines)
    assert any("conv" in x and "not compiled" in x and "= 1.15 (target ≤ 1.1: MISS)" in x
               for x in lines)
    assert any("conv" in x and "diffrax" in x and "PASS" in x for x in lines)
    assert not any("conv" in x and "jit_compile=True)" in x for x in lines)  # not a target
    assert any("threebody" in x and "= 1.50 (target ≤ 1.2: MISS)" in x for x in lines)
    # A peer that did not run is a miss, never a pass.
    assert any("threebody" in x and "diffrax" in x and "n/a" in x and "MISS" in x for x in lines)


@pytest.mark.slow
def test_keras_fit_benchmark_runs_and_modes_train_alike(tmp_path):
    import keras_fit

    out = tmp_path / "fit.md"
    results = keras_fit.main(["--quick", "--modes", "default,nojit,drift", "--out", str(out)])
    assert set(results) == {"default", "nojit", "drift"}
    low, high = results["drift"]["batch_steps"]
    assert low < high  # the drift mode's batches take different numbers of steps
    # Same initial weights and batches: the compiled loops train the same model.
    np.testing.assert_allclose(results["default"]["loss"], results["nojit"]["loss"], rtol=1e-3)
    assert results["default"]["steps"] == results["nojit"]["steps"]
    table = out.read_text()
    assert "| Keras default compile, ODELayer default" in table and "n/a" in table

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


def test_cde_step_hermite_formula_matches_tfaca_path():
    """benchmarks/cde_step.py checks every library's path against this NumPy formula."""
    import cde_step

    import tfaca

    p = cde_step.make_problem("noisy")
    t = cde_step.query_times(p["times"], count=41)
    path = tfaca.HermitePath(p["times"].astype(np.float64), p["values"].astype(np.float64))
    got = np.stack([path.derivative(tf.constant(x, tf.float64)).numpy() for x in t])
    want = cde_step.hermite_derivative(p["times"], p["values"], t)
    assert want.shape == (41, cde_step.BATCH, cde_step.CHANNELS)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    # Channel 0 is the time: its derivative is 1 everywhere.
    np.testing.assert_allclose(want[..., 0], 1.0, rtol=1e-9)


def _cde_entry(step_s, steps=99, rejected=0):
    return dict(step_s=step_s, steps=steps, rejected=rejected, first_s=1.0, loss=1.0,
                other_load=0.0)


def test_cde_step_target_is_default_mode_against_the_faster_free_peer():
    """tfaca's default mode, with either error estimate, is judged against the peers
    choosing their own steps; XLA and tfaca-knots (against the peers stepping onto the
    knots) are reported, never judged; a missing peer is a miss."""
    import cde_step

    results = {"noisy": {
        "tfaca": _cde_entry(0.100, steps=90, rejected=70),
        "tfaca-shampine": _cde_entry(0.130, steps=80, rejected=25),
        "tfaca-xla": _cde_entry(0.080, steps=90, rejected=70),
        "tfaca-knots": _cde_entry(0.120),
        "torchcde": _cde_entry(0.500, steps=80), "diffrax": _cde_entry(0.170, steps=80),
        "torchcde-adjoint": dict(error="RuntimeError: failed"),
        "diffrax-knots": _cde_entry(0.140),
    }}
    lines = cde_step.targets(results, ["noisy"]).splitlines()
    assert len(lines) == 4
    assert sum("target ≤ 0.7" in x for x in lines) == 2
    free = next(x for x in lines if "default mode /" in x)
    assert free.endswith("own steps (diffrax): 100.0 / 170.0 ms = 0.59 (target ≤ 0.7: PASS)")
    peers = next(x for x in lines if "the peers' error estimate" in x)
    assert peers.endswith("own steps (diffrax): 130.0 / 170.0 ms = 0.76 (target ≤ 0.7: MISS)")
    knots = next(x for x in lines if "tfaca onto the knots" in x)
    assert knots.endswith("(diffrax-knots): 120.0 / 140.0 ms = 0.86 (not judged)")
    xla = next(x for x in lines if "tfaca XLA" in x)
    assert xla.endswith("own steps (diffrax): 80.0 / 170.0 ms = 0.47 (not judged)")
    # No peer choosing its own steps ran: a miss, never a pass.
    for k in ("torchcde", "diffrax", "torchcde-adjoint"):
        del results["noisy"][k]
    lines = cde_step.targets(results, ["noisy"]).splitlines()
    free = next(x for x in lines if "default mode /" in x)
    assert free.endswith("n/a, no such peer ran (target ≤ 0.7: MISS)")
    # A ratio that rounds onto the target shows a third decimal.
    results["noisy"]["diffrax"] = _cde_entry(0.14285)
    lines = cde_step.targets(results, ["noisy"]).splitlines()
    assert "= 0.700 (target ≤ 0.7: MISS)" in next(x for x in lines if "default mode /" in x)


def test_cde_step_diagnostics_report_the_path_gradients_share_and_steps():
    import cde_step

    rows = {"tfaca": _cde_entry(0.050, steps=28, rejected=8),
            "tfaca-closure": _cde_entry(0.040, steps=28, rejected=8),
            "tfaca-shampine": _cde_entry(0.045, steps=23, rejected=6),
            "torchcde": _cde_entry(0.100, steps=21, rejected=4),
            "torchcde-dpweights": _cde_entry(0.120, steps=29, rejected=10)}
    text = cde_step.diagnostics({"smooth": rows}, ["smooth"])
    assert "the path's gradients take 20% of the step" in text
    assert ("accepted/rejected steps: tfaca 28/8, tfaca-shampine 23/6, torchcde 21/4, "
            "torchcde-dpweights 29/10" in text)
    # The diagnostics stay out of BENCHMARKS.md's table and out of the target.
    meta = dict(problems=["smooth"], libs=cde_step.ALL, command="python cde_step.py",
                date="today", threads=1, note="")
    section = cde_step.docs_section({"smooth": rows}, meta)
    assert "tfaca-closure" not in section and "closed-over" not in section
    assert "1 thread per library on a" in section


@pytest.mark.slow
def test_cde_step_benchmark_runs_and_tfaca_matches_the_float64_reference(tmp_path):
    """The benchmark's tfaca entries in --quick (the peers are not installed here): each in
    a child process, against the float64 reference."""
    import cde_step

    out = tmp_path / "cde_step.md"
    results = cde_step.main(["--quick", "--libs",
                             "tfaca,tfaca-shampine,tfaca-xla,tfaca-knots,tfaca-closure",
                             "--threads", "1", "--no-docs", "--out", str(out),
                             "--json", str(tmp_path / "results.json"),
                             "--cache", str(tmp_path)])
    rows = results["noisy"]
    for lib in ("tfaca", "tfaca-shampine", "tfaca-xla", "tfaca-knots", "tfaca-closure"):
        r = rows[lib]
        assert "error" not in r, r.get("traceback")
        assert r["finite"]
        assert r["nfe_bwd"] > 0
        assert r["path_err"] < 1e-5
        assert len(r["times_s"]) == 3 and r["step_s"] > 0
    # Stepping onto every observation time: one accepted step per interval, none rejected,
    # and the loss and gradients of the float64 reference to about the tolerance.
    knots = rows["tfaca-knots"]
    assert knots["steps"] == cde_step.OBSERVATIONS - 1 and knots["rejected"] == 0
    assert knots["loss_err"] < 1e-4 and knots["grad_err"] < 1e-2
    # Choosing its own steps across the knots of the noisy path (the Hermite path's second
    # derivative jumps there), the error control rejects steps, and the loss and gradients
    # are off by the discretisation error.
    for lib in ("tfaca", "tfaca-shampine", "tfaca-xla"):
        r = rows[lib]
        assert r["rejected"] > 0 and r["steps"] < 2 * cde_step.OBSERVATIONS
        assert r["loss_err"] < 0.1 and r["grad_err"] < 0.5
    # The path closed over in func is the same ODE on the same steps, without the path's
    # gradients: the same loss and weight gradients to rounding.
    closure = rows["tfaca-closure"]
    assert (closure["steps"], closure["rejected"]) == (rows["tfaca"]["steps"],
                                                      rows["tfaca"]["rejected"])
    assert abs(closure["loss"] - rows["tfaca"]["loss"]) < 1e-5 * rows["tfaca"]["loss"]
    assert closure["grad_vs_tfaca"] < 1e-4
    text = out.read_text()
    assert "| noisy | tfaca | default mode" in text
    assert "## Diagnostics (not in the target)" in text
    # No peer ran: the target is not met.
    assert "no such peer ran (target ≤ 0.7: MISS)" in text


def test_stiff_fields_match_numpy_and_their_jacobians():
    """benchmarks/stiff.py: one formula per field in NumPy and TensorFlow, and the analytic
    Jacobians SciPy's reference solves are given (Radau, BDF) against TensorFlow's."""
    import stiff

    rng = np.random.default_rng(0)
    for name in ("robertson", "vdp"):
        p = stiff.make_problems(quick=True)[name]
        for _ in range(3):
            y = np.abs(rng.standard_normal(p.y0.shape)) * np.maximum(np.abs(p.y0), 1e-3)
            params = p.params * np.exp(0.1 * rng.standard_normal(p.params.shape))
            yt = tf.constant(y)
            with tf.GradientTape() as tape:
                tape.watch(yt)
                f = p.field(tf.stack, yt, tf.constant(params))
            np.testing.assert_allclose(f.numpy(), p.field(np.stack, y, params), rtol=1e-12)
            want = tape.jacobian(f, yt).numpy()
            got = p.scipy_jac(params)(0.0, y)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    # The batch's Jacobian is block diagonal, one block per system.
    p = stiff.make_problems(quick=True)["robertson_batch"]
    y = np.abs(rng.standard_normal(p.y0.shape))
    blocks = p.scipy_jac(p.params)(0.0, y.ravel())
    assert blocks.shape == (p.y0.size, p.y0.size)
    np.testing.assert_allclose(blocks[3:6, 3:6], stiff.robertson_jacobian(y[1], p.params[1]))
    assert not blocks[:3, 3:].any()


@pytest.mark.slow
def test_stiff_benchmark_quick_run_has_every_solver_and_tfaca_meets_its_tolerance(tmp_path):
    """benchmarks/stiff.py --quick (Robertson to t = 40): a row per solver, tfaca's
    Kvaerno5 within 100 rtol of the Radau reference, its ACA gradient at the finite
    differences (and at diffrax's, where diffrax is installed), Dopri5 stopped by
    max_steps."""
    import stiff

    out = tmp_path / "stiff.md"
    results = stiff.main(["--quick", "--out", str(out)])
    assert list(results) == ["robertson"]
    forward, gradients = results["robertson"]["forward"], results["robertson"]["gradients"]
    peer = stiff.diffrax_available()
    expected = ["tfaca-kvaerno5", "scipy-radau", "scipy-bdf", "tfaca-dopri5"]
    expected += ["diffrax-kvaerno5"] if peer else []
    for key in expected:
        assert "error" not in forward[key], forward[key]
    rtol = stiff.make_problems(quick=True)["robertson"].rtol
    tfaca_fwd = forward["tfaca-kvaerno5"]
    assert tfaca_fwd["status"] == "SUCCESS"
    assert 5 <= tfaca_fwd["steps"] <= 500
    assert tfaca_fwd["jacobians"] == tfaca_fwd["steps"] + tfaca_fwd["rejected"]
    assert tfaca_fwd["rel_err"] <= 100 * rtol
    for key in ("scipy-radau", "scipy-bdf") + (("diffrax-kvaerno5",) if peer else ()):
        assert forward[key]["rel_err"] <= 100 * rtol, key
    # The explicit solver cannot cross the stiff span in 10,000 trials.
    dopri = forward["tfaca-dopri5"]
    assert dopri["status"] == "MAX_STEPS_REACHED" and dopri["t_final"] < 40.0
    grad = gradients["tfaca-kvaerno5"]
    assert "error" not in grad, grad
    assert np.all(np.isfinite(grad["grad"])) and grad["fwdbwd_ms"] > 0
    assert grad["vs_fd"] < 1e-3
    if peer:
        assert gradients["diffrax-kvaerno5"]["vs_fd"] < 1e-3
        assert grad["vs_other"] < 1e-3
    text = out.read_text()
    labels = ["tfaca Kvaerno5", "SciPy Radau", "SciPy BDF", "tfaca Dopri5", "tfaca Kvaerno5, ACA"]
    labels += ["diffrax Kvaerno5", "diffrax Kvaerno5, RecursiveCheckpointAdjoint"] if peer else []
    for label in labels:
        assert f"\n| {label} | " in text, label
    assert "## Forward+backward: tfaca / diffrax (target ≤ 1.0)" in text

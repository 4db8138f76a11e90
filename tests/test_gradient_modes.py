"""The three gradient strategies side by side: ACA, the continuous adjoint and naive backprop.

- all three converge to the analytic gradient at tight tolerances;
- each gives the same gradient eagerly, in `tf.function` and under XLA;
- the paper's claims that tell them apart: the adjoint's backward reconstruction of the
  trajectory drifts while ACA is exact for the discrete solve; naive differentiates the
  step-size choice too, so it is the derivative of the whole adaptive solve (finite
  differences of `tfaca.solve` agree with it) while ACA is the derivative of the
  accepted steps;
- the cost counters, failure of the adjoint's reverse solve, and a quick run of
  `examples/gradient_accuracy.py`.
"""

import importlib.util
import pathlib

import keras
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

import tfaca
from helpers import (
    A_NP, MODES, accepted_steps, assert_grads_close, frechet_expm, strategy, unrolled_solve,
)

F64 = tf.float64
ROOT = pathlib.Path(__file__).resolve().parents[1]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def vdp(t, y):
    x, v = tf.unstack(y)
    return tf.stack([v, (1.0 - x * x) * v - x])


# ---------------------------------------------------------------------------------------
# All three strategies converge to the analytic gradient.

LIN_Y0 = np.array([1.0, 0.5, -0.3])
LIN_TS = np.array([0.0, 0.7, 1.5, 3.0])
LIN_C = np.random.default_rng(7).normal(size=(len(LIN_TS), 3))


def linear_analytic():
    """L = sum_j c_j . y(t_j) + ||y(t_last)||^2 / 2 for y' = A y: dL/dy0, dL/dA, dL/dts."""
    taus = LIN_TS - LIN_TS[0]
    ys = [scipy.linalg.expm(A_NP * tau) @ LIN_Y0 for tau in taus]
    cot = [LIN_C[j].copy() for j in range(len(taus))]
    cot[-1] += ys[-1]
    g_y0 = cot[0].copy()
    g_a = np.zeros((3, 3))
    g_ts = np.zeros(len(taus))
    for j in range(1, len(taus)):
        g_y0 += scipy.linalg.expm(A_NP * taus[j]).T @ cot[j]
        g_ts[j] = cot[j] @ (A_NP @ ys[j])
        for i in range(3):
            for k in range(3):
                direction = np.zeros((3, 3))
                direction[i, k] = taus[j]
                g_a[i, k] += cot[j] @ frechet_expm(A_NP * taus[j], direction) @ LIN_Y0
    g_ts[0] = -(g_y0 - cot[0]) @ (A_NP @ LIN_Y0)
    return g_y0, g_a, g_ts


def linear_loss(ys):
    return tf.reduce_sum(tf.constant(LIN_C) * ys) + 0.5 * tf.reduce_sum(tf.square(ys[-1]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow_variants
def test_tight_tolerance_matches_analytic(mode):
    y0, a, ts = tf.constant(LIN_Y0), tf.constant(A_NP), tf.constant(LIN_TS)
    with tf.GradientTape() as tape:
        tape.watch([y0, a, ts])
        sol = tfaca.solve(lambda t, y, a: tf.linalg.matvec(a, y), y0, ts, args=(a,),
                          rtol=1e-10, atol=1e-10, gradient=strategy(mode))
        loss = linear_loss(sol.ys)
    grads = tape.gradient(loss, [y0, a, ts])
    assert int(sol.stats.num_steps) > 50  # a real adaptive solve, not a handful of steps
    assert_grads_close(grads, linear_analytic(), 1e-6, f"{mode}: dL/d(y0, A, ts)")


# ---------------------------------------------------------------------------------------
# Same gradients eagerly, in tf.function and under XLA: nested state, Keras weights, ts.

NEST_TS = np.array([0.0, 0.4, 1.1, 2.0])


def nested_gradients(mode, dense, y0, k, ts):
    """A dict-of-tuple state driven by a Keras Dense layer; gradients of a loss on every
    output with respect to y0 (all leaves), an arg, ts and the layer's weights."""

    def func(t, y, k):
        q, (p, _) = y["q"], y["ps"]
        push = dense(tf.concat([q, p], -1)[None])[0]
        dp = -q - 0.1 * p + 2.0 * push * tf.cos(5.0 * t)
        return {"q": p, "ps": (dp, k * tf.reduce_sum(q * q))}

    sources = [y0, k, ts, dense.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch([y0, k, ts])
        sol = tfaca.solve(func, y0, ts, args=(k,), rtol=1e-6, atol=1e-6,
                          gradient=strategy(mode), max_steps=200)
        q, (p, s) = sol.ys["q"], sol.ys["ps"]
        weights = tf.constant([0.0, 0.5, 1.0, 2.0], F64)
        loss = tf.reduce_sum(weights[:, None] * (q + 0.5 * p * p)) + tf.reduce_sum(weights * s)
    return tape.gradient(loss, sources), sol.stats.num_steps, sol.stats.num_rejected


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
def test_execution_modes_agree(mode):
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(2, activation="tanh", dtype="float64")
    dense.build((None, 4))
    y0 = {"q": tf.constant([1.0, -0.5], F64),
          "ps": (tf.constant([0.2, 0.7], F64), tf.constant(0.0, F64))}
    k, ts = tf.constant(0.3, F64), tf.constant(NEST_TS)

    def run():
        return nested_gradients(mode, dense, y0, k, ts)

    eager, steps, rejected = run()
    assert int(steps) >= 10 and int(rejected) >= 1  # rejected trials are part of the test
    for name, fn in (("tf.function", tf.function(run)),
                     ("jit_compile", tf.function(run, jit_compile=True))):
        grads, steps_fn, _ = fn()
        assert int(steps_fn) == int(steps), name
        flat_eager, flat = tf.nest.flatten(eager), tf.nest.flatten(grads)
        assert len(flat) == len(flat_eager) == 7  # q, p, s, k, ts, kernel, bias
        assert all(np.any(np.asarray(g) != 0) for g in flat_eager)
        assert_grads_close(flat, flat_eager, 1e-10, f"{mode} {name} vs eager")


# ---------------------------------------------------------------------------------------
# The paper's reverse-accuracy claim (its Fig. 4).


def test_adjoint_reconstruction_drifts_while_aca_is_exact():
    y0, ts = tf.constant([2.0, 0.0], F64), tf.constant([0.0, 6.0], F64)
    tol = dict(rtol=1e-5, atol=1e-6)
    with tf.GradientTape() as tape:
        tape.watch(y0)
        sol = tfaca.solve(vdp, y0, ts, gradient="aca", **tol)
        loss = 0.5 * tf.reduce_sum(tf.square(sol.ys[-1]))
    g_aca = tape.gradient(loss, y0)

    # ACA: the exact gradient of the accepted steps, unrolled.
    steps = accepted_steps(vdp, y0, ts, **tol)
    with tf.GradientTape() as tape:
        tape.watch(y0)
        ys_ref = unrolled_solve(vdp, y0, ts, steps)
        loss_ref = 0.5 * tf.reduce_sum(tf.square(ys_ref[-1]))
    g_ref = tape.gradient(loss_ref, y0)
    aca_discrepancy = float(np.max(np.abs(g_aca - g_ref)))
    assert aca_discrepancy <= 1e-12 * float(np.max(np.abs(g_ref)))

    # The adjoint's y-part: the same ODE solved backwards from y(T) with the same tolerances.
    reverse = tfaca.solve(vdp, sol.ys[-1], ts[::-1], **tol)
    drift = float(np.linalg.norm(reverse.ys[-1] - y0))
    assert drift > 1e-3
    assert drift > 100 * aca_discrepancy


# ---------------------------------------------------------------------------------------
# Naive differentiates the step-size choice: it is the derivative of the whole adaptive solve.


def test_naive_is_derivative_of_adaptive_solve_aca_of_accepted_steps():
    y0_np, ts = np.array([1.7, 0.4]), tf.constant([0.0, 3.0], F64)
    tol = dict(rtol=1e-3, atol=1e-6)

    def solve(y0, mode="aca"):
        sol = tfaca.solve(vdp, y0, ts, gradient=mode, **tol)
        return 0.5 * tf.reduce_sum(tf.square(sol.ys[-1])), sol.stats

    grads = {}
    for mode in ("aca", "naive"):
        y0 = tf.constant(y0_np)
        with tf.GradientTape() as tape:
            tape.watch(y0)
            loss, stats = solve(y0, mode)
        grads[mode] = tape.gradient(loss, y0).numpy()
    assert int(stats.num_rejected) >= 1

    # Central differences of tfaca.solve itself (step sizes re-chosen at each point), and
    # of the accepted-step map (step sizes frozen). eps = 1e-6 keeps every decision of
    # the adaptive loop (asserted) and the rounding error small.
    steps = accepted_steps(vdp, tf.constant(y0_np), ts, **tol)
    eps = 1e-6
    fd_solve, fd_steps = np.zeros(2), np.zeros(2)
    for k in range(2):
        e = np.zeros(2)
        e[k] = eps
        (l_plus, s_plus), (l_minus, s_minus) = (solve(tf.constant(y0_np + sign * e))
                                                for sign in (1, -1))
        for s in (s_plus, s_minus):
            assert (int(s.num_steps), int(s.num_rejected)) == (
                int(stats.num_steps), int(stats.num_rejected))
        fd_solve[k] = (float(l_plus) - float(l_minus)) / (2 * eps)
        ends = [unrolled_solve(vdp, tf.constant(y0_np + sign * e), ts, steps)[-1]
                for sign in (1, -1)]
        fd_steps[k] = 0.5 * (np.sum(ends[0] ** 2) - np.sum(ends[1] ** 2)) / (2 * eps)

    assert rel(grads["naive"], grads["aca"]) > 1e-6
    assert rel(grads["naive"], fd_solve) < 1e-5
    assert rel(grads["aca"], fd_solve) > 100 * rel(grads["naive"], fd_solve)
    assert rel(grads["aca"], fd_steps) < 1e-6


# ---------------------------------------------------------------------------------------
# Cost counters and failures.


@pytest.mark.slow
def test_backward_fevals_counters():
    y0, ts = tf.constant([2.0, 0.0], F64), tf.constant([0.0, 2.0, 4.0], F64)
    stats = {}
    for mode in MODES:
        grad = strategy(mode)
        with tf.GradientTape() as tape:
            tape.watch(y0)
            sol = tfaca.solve(vdp, y0, ts, rtol=1e-6, atol=1e-6, gradient=grad,
                              interpolate=False)
            loss = tf.reduce_sum(sol.ys)
        if mode == "adjoint":  # counters exist from the start, at 0
            assert int(grad.backward_stats.num_fevals) == 0
        tape.gradient(loss, y0)
        stats[mode] = sol.stats
        if mode == "adjoint":
            assert int(grad.backward_stats.num_fevals) > 0
            assert int(grad.backward_stats.num_steps) > 0
    n = int(stats["aca"].num_steps)
    assert n > 10
    assert int(stats["aca"].num_fevals_backward) == tfaca.Dopri5.tableau.solution_stages * n
    assert int(stats["naive"].num_fevals_backward) == 0
    assert int(stats["adjoint"].num_fevals_backward) == -1
    # The forward solve is the same whatever the gradient.
    for mode in ("adjoint", "naive"):
        assert int(stats[mode].num_steps) == n
        assert int(stats[mode].num_fevals) == int(stats["aca"].num_fevals)


def _failing_adjoint_gradient():
    a = tf.constant([[-0.1, 1.0], [-1.0, -0.1]], F64)
    y0 = tf.constant([1.0, 0.0], F64)
    with tf.GradientTape() as tape:
        tape.watch([y0, a])
        sol = tfaca.solve(lambda t, y, a: tf.linalg.matvec(a, y), y0,
                          tf.constant([0.0, 5.0], F64), args=(a,), rtol=1e-8, atol=1e-8,
                          gradient=tfaca.AdjointGradient(max_steps=3))
        loss = tf.reduce_sum(sol.ys[-1])
    return tape.gradient(loss, [y0, a])


@pytest.mark.slow
def test_adjoint_reverse_failure_raises():
    with pytest.raises(tfaca.SolveError, match="adjoint"):
        _failing_adjoint_gradient()
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_steps"):
        tf.function(_failing_adjoint_gradient)()
    # XLA has no run-time assertions: the gradient is NaN, never a finite wrong value.
    grads = tf.function(_failing_adjoint_gradient, jit_compile=True)()
    assert all(np.all(np.isnan(g)) for g in grads)


# ---------------------------------------------------------------------------------------
# The example.


def test_gradient_accuracy_example_quick(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "gradient_accuracy", ROOT / "examples" / "gradient_accuracy.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out_dir = tmp_path / "out"  # does not exist yet: the example creates it
    result = example.main(["--quick", "--out-dir", str(out_dir)])

    for name in ("reverse_trajectory.png", "gradient_error.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (out_dir / "gradient_error.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 3 * 3  # header + 3 T values x 3 strategies
    assert "| adjoint |" in (out_dir / "gradient_error.md").read_text()
    cost_md = (out_dir / "cost.md").read_text()
    assert all(f"| {mode} |" in cost_md for mode in MODES)

    assert result["reverse_error_t0"] > 1e-3
    assert result["aca_vs_unrolled"] < 1e-12
    for t, err in result["errors"]["aca"].items():
        assert err["rel_err_y0"] < 1e-3 and err["rel_err_A"] < 1e-3, (t, err)
    cost = result["cost"]
    assert cost["aca"]["num_steps"] >= 50
    assert cost["aca"]["backward_fevals"] == 6 * cost["aca"]["num_steps"]  # dopri5 replays 6 stages
    assert cost["naive"]["backward_fevals"] == 0
    assert cost["adjoint"]["backward_fevals"] > 0
    for mode in MODES:
        assert cost[mode]["forward_backward_ms"] > 0
        assert cost[mode]["peak_rss_rise_mb"] >= 0  # measured in the process (--quick)

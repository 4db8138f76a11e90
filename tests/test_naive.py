"""Naive backprop (`tfaca._gradients._naive`): the tape records every trial step, so the
gradient differentiates the step-size choice too: it is the derivative of the whole
adaptive solve (finite differences of `tfaca.solve` agree with it), also under XLA and to
second order."""

import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import (
    A_NP, F64, SHORT_TS, Y0_NP, accepted_steps, assert_grads_close, f64, hvp, projection_loss,
    random_per_sample_ts, random_y0, relative_error, tanh_field, unrolled_solve, van_der_pol,
    variable_linear_problem,
)


# --------------------------------------------------------------------------------------
# Naive differentiates the step-size choice: it is the derivative of the whole adaptive solve
# --------------------------------------------------------------------------------------


def test_naive_is_derivative_of_adaptive_solve_aca_of_accepted_steps():
    y0_np, ts = np.array([1.7, 0.4]), tf.constant([0.0, 3.0], F64)
    tol = dict(rtol=1e-3, atol=1e-6)

    def solve(y0, mode="aca"):
        sol = tfaca.solve(van_der_pol, y0, ts, gradient=mode, **tol)
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
    steps = accepted_steps(van_der_pol, tf.constant(y0_np), ts, **tol)
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
        ends = [unrolled_solve(van_der_pol, tf.constant(y0_np + sign * e), ts, steps)[-1]
                for sign in (1, -1)]
        fd_steps[k] = 0.5 * (np.sum(ends[0] ** 2) - np.sum(ends[1] ** 2)) / (2 * eps)

    assert relative_error(grads["naive"], grads["aca"]) > 1e-6
    assert relative_error(grads["naive"], fd_solve) < 1e-5
    assert relative_error(grads["aca"], fd_solve) > 100 * relative_error(grads["naive"], fd_solve)
    assert relative_error(grads["aca"], fd_steps) < 1e-6


# --------------------------------------------------------------------------------------
# Under XLA
# --------------------------------------------------------------------------------------


@pytest.mark.slow_variants
@pytest.mark.parametrize("times", ["shared", "per_sample"])
def test_naive_under_xla_equals_naive_eagerly(times):
    """Under XLA an output write that keeps nothing goes past the end of the buffer and is
    dropped; its values must take no gradient either (the scatter's gradient reads them
    with a gather that XLA clamps into the buffer: the naive gradient was silently wrong,
    g_y0 off by 8.5 in tests/test_regression.py's t6-dense-shared-naive-dopri5-xla)."""
    A, func = variable_linear_problem()
    y0 = random_y0(batch=4)
    ts = tf.constant(random_per_sample_ts() if times == "per_sample" else np.linspace(0.0, 3.0, 9),
                     F64)

    def grads(y0, ts):
        with tf.GradientTape() as tape:
            tape.watch([y0, ts])
            loss = projection_loss(tfaca.odeint(func, y0, ts, args=(1.0,), gradient="naive",
                                      max_steps=200))
        return tape.gradient(loss, [y0, A, ts])

    eager = grads(y0, ts)
    compiled = tf.function(grads, jit_compile=True)(y0, ts)
    assert_grads_close(compiled, eager, rtol=1e-12, name="naive under XLA")


# --------------------------------------------------------------------------------------
# Second derivatives
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_naive_hessian_vector_product_matches_finite_differences():
    y0, W, ts = f64(Y0_NP), f64(A_NP), f64(SHORT_TS)

    def loss(x):
        return tf.reduce_sum(tfaca.odeint(tanh_field, x, ts, args=(W,), gradient="naive",
                                          method="rk4", step_size=0.05) ** 3)

    v = f64([0.3, -0.2, 0.5])
    got = hvp(loss, y0, v).numpy()

    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = loss(x)
        return tape.gradient(out, x).numpy()

    h = 1e-5
    fd = (grad(y0 + h * v) - grad(y0 - h * v)) / (2 * h)
    np.testing.assert_allclose(got, fd, rtol=1e-6)

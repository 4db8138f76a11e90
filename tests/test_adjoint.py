"""The continuous adjoint (`tfaca._gradients._adjoint`): its reverse solve rebuilds the
trajectory and drifts where ACA is exact (the paper's Fig. 4); a failure of the reverse
solve raises, or not with `throw=False`; its counters; second derivatives refused."""

import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import (
    A_NP, F64, SHORT_TS, Y0_NP, accepted_steps, f64, hvp, tanh_field, unrolled_solve,
    van_der_pol,
)


# --------------------------------------------------------------------------------------
# The paper's reverse-accuracy claim (its Fig. 4)
# --------------------------------------------------------------------------------------


def test_adjoint_reconstruction_drifts_while_aca_is_exact():
    y0, ts = tf.constant([2.0, 0.0], F64), tf.constant([0.0, 6.0], F64)
    tol = dict(rtol=1e-5, atol=1e-6)
    with tf.GradientTape() as tape:
        tape.watch(y0)
        sol = tfaca.solve(van_der_pol, y0, ts, gradient="aca", **tol)
        loss = 0.5 * tf.reduce_sum(tf.square(sol.ys[-1]))
    g_aca = tape.gradient(loss, y0)

    # ACA: the exact gradient of the accepted steps, unrolled.
    steps = accepted_steps(van_der_pol, y0, ts, **tol)
    with tf.GradientTape() as tape:
        tape.watch(y0)
        ys_ref = unrolled_solve(van_der_pol, y0, ts, steps)
        loss_ref = 0.5 * tf.reduce_sum(tf.square(ys_ref[-1]))
    g_ref = tape.gradient(loss_ref, y0)
    aca_discrepancy = float(np.max(np.abs(g_aca - g_ref)))
    assert aca_discrepancy <= 1e-12 * float(np.max(np.abs(g_ref)))

    # The adjoint's y-part: the same ODE solved backwards from y(T) with the same tolerances.
    reverse = tfaca.solve(van_der_pol, sol.ys[-1], ts[::-1], **tol)
    drift = float(np.linalg.norm(reverse.ys[-1] - y0))
    assert drift > 1e-3
    assert drift > 100 * aca_discrepancy


# --------------------------------------------------------------------------------------
# A failure of the reverse solve
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# throw=False, and the counters after a graph
# --------------------------------------------------------------------------------------


def _blow_up(t, y):
    return y * y


def test_adjoint_with_throw_false_never_raises():
    """y' = y^2 from 1 blows up at t = 1: the forward fails, outputs past it are NaN,
    and the gradient is NaN instead of an exception."""
    y0, ts = f64([1.0]), f64([0.0, 0.5, 2.0])
    with tf.GradientTape() as tape:
        tape.watch(y0)
        sol = tfaca.solve(_blow_up, y0, ts, gradient="adjoint", throw=False)
        loss = tf.reduce_sum(sol.ys)
    assert int(sol.status) != 0
    g = tape.gradient(loss, y0)
    assert np.all(np.isnan(g.numpy()))


def test_adjoint_reverse_failure_raises_with_throw():
    """The same failure in the reverse solve, with throw=True, is reported."""
    y0, ts = f64([1.0]), f64([0.0, 0.5])
    grad = tfaca.AdjointGradient(max_steps=2)
    with tf.GradientTape() as tape:
        tape.watch(y0)
        loss = tf.reduce_sum(tfaca.odeint(_blow_up, y0, ts, gradient=grad, rtol=1e-8, atol=1e-8))
    with pytest.raises(tfaca.SolveError, match="reverse solve"):
        tape.gradient(loss, y0)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.slow
def test_adjoint_counters_readable_after_a_graph(jit_compile):
    grad = tfaca.AdjointGradient()
    y0, ts = f64(Y0_NP), f64(SHORT_TS)

    @tf.function(jit_compile=jit_compile)
    def run(y0):
        with tf.GradientTape() as tape:
            tape.watch(y0)
            loss = tf.reduce_sum(tfaca.odeint(tanh_field, y0, ts, args=(f64(A_NP),),
                                              gradient=grad) ** 2)
        return tape.gradient(loss, y0)

    run(y0)
    first = int(grad.backward_stats.num_fevals)
    assert first > 0 and int(grad.backward_stats.num_steps) > 0
    # Eagerly, the same solve counts the same.
    with tf.GradientTape() as tape:
        tape.watch(y0)
        loss = tf.reduce_sum(tfaca.odeint(tanh_field, y0, ts, args=(f64(A_NP),), gradient=grad) ** 2)
    tape.gradient(loss, y0)
    assert int(grad.backward_stats.num_fevals) == first


def test_adjoint_counters_live_on_the_device_of_the_computation():
    # A train step compiled whole by XLA on a GPU (Keras' default there) assigns the
    # counters: TensorFlow keeps int32 variables in host memory, out of XLA's reach there,
    # so they must be of a dtype that lives where float variables do (int64, as Keras'
    # own step counter). On a CPU both are on the CPU; on a GPU the check tells.
    grad = tfaca.AdjointGradient()
    beside = tf.Variable(0.0)
    for counter in grad.backward_stats:
        assert counter.dtype == tf.int64
        assert tf.DeviceSpec.from_string(counter.device).device_type == \
            tf.DeviceSpec.from_string(beside.device).device_type


# --------------------------------------------------------------------------------------
# Second derivatives
# --------------------------------------------------------------------------------------


def test_adjoint_second_derivative_raises():
    y0, W, ts = f64(Y0_NP), f64(A_NP), f64(SHORT_TS)

    def loss(x):
        return tf.reduce_sum(tfaca.odeint(tanh_field, x, ts, args=(W,), gradient="adjoint") ** 2)

    with pytest.raises(NotImplementedError, match="differentiated again.*aca"):
        hvp(loss, y0, y0)

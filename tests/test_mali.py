"""MALI (`tfaca._gradients._mali`): with the ALF solver, the backward pass rebuilds each
step's start by ALF's inverse instead of keeping it. Its gradient equals backprop through
the same ALF steps unrolled in Python (1e-10 relative in float64), with adaptive and
fixed steps, nested states, time gradients and interpolated outputs."""

import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import (
    F64, GRADIENT_NAMES, MLP_TIMES, NESTED_TS, assert_relative, f64, field_gradients,
    mlp_gradients, nested_y0, NestedField, recorded_trajectory, weighted_loss,
)


# --------------------------------------------------------------------------------------
# Against backprop through the same ALF steps
# --------------------------------------------------------------------------------------


def _unrolled_alf_gradients(field, y0, ts, solver, rtol):
    """Backprop through the ALF steps the solver accepted, unrolled in Python: each step
    starts at its recorded offset from the output time before it, and the step that
    lands on an output ends on it (so the times get their gradients)."""
    dtype = y0[0].dtype
    cp = recorded_trajectory(solver, field, ts, y0, rtol).checkpoints
    y0_vars = [tf.Variable(y) for y in y0]
    ts_var = tf.Variable(tf.constant(ts, dtype))
    with tf.GradientTape() as tape:
        y = [tf.identity(v) for v in y0_vars]
        v = list(field(ts_var[0], y))
        outs = [y]
        for i in range(int(cp.num_steps)):
            j, hit = int(cp.interval[i, 0]), bool(cp.hit[i, 0])
            t = ts_var[j - 1] + (cp.t[i, 0] - ts[j - 1])
            dt = ts_var[j] - t if hit else cp.dt[i, 0]
            y, v, _ = solver.step(field, t, y, v, dt)
            if hit:
                outs.append(y)
        loss = weighted_loss([tf.stack(parts) for parts in zip(*outs)])
    grads = tape.gradient(loss, [*y0_vars, ts_var, field.W, field.b])
    return int(cp.num_steps), [g.numpy() for g in grads]


def test_mali_equals_backprop_through_the_same_alf_steps():
    field, y0 = NestedField(), nested_y0()
    solver = tfaca.ALF()
    n, got = field_gradients(field, y0, NESTED_TS, method=solver, gradient="mali", rtol=1e-4, atol=1e-4)
    n_ref, expected = _unrolled_alf_gradients(field, y0, NESTED_TS, solver, 1e-4)
    assert n == n_ref > 50
    assert_relative(got, expected, 1e-10)


def test_mali_damped_few_steps_is_exact_and_many_steps_drift_is_reported():
    """The damped inverse magnifies rounding by 1 / |1 - 2 damping| per step: over a few
    steps MALI's gradient is still backprop's; over many, the rebuilt start drifts
    and the gradient raises instead of being silently wrong."""
    field, y0 = NestedField(), nested_y0()
    solver = tfaca.ALF(damping=0.8)
    n, got = field_gradients(field, y0, NESTED_TS, method=solver, gradient="mali", rtol=1e-2, atol=1e-2)
    n_ref, expected = _unrolled_alf_gradients(field, y0, NESTED_TS, solver, 1e-2)
    assert n == n_ref and n < 25
    assert_relative(got, expected, 1e-8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="did not rebuild the start"):
        field_gradients(field, y0, NESTED_TS, method=solver, gradient="mali", step_size=0.01)


def test_mali_with_fixed_steps_equals_naive():
    """Fixed steps do not depend on the inputs, so naive backprop through the loop is
    backprop through the same steps."""
    field, y0 = NestedField(), nested_y0()
    _, got = field_gradients(field, y0, NESTED_TS, method="alf", step_size=0.05, gradient="mali")
    _, expected = field_gradients(field, y0, NESTED_TS, method="alf", step_size=0.05, gradient="naive")
    assert_relative(got, expected, 1e-10)


def test_alf_gradient_modes_agree():
    """MALI, naive and the adjoint on ALF's solve: three ways to one gradient, to the
    solve's accuracy; the adjoint's reverse solve runs ALF on the augmented system."""
    field, y0 = NestedField(), nested_y0()
    kwargs = dict(method="alf", step_size=0.02)
    _, mali = field_gradients(field, y0, [0.0, 1.0], gradient="mali", **kwargs)
    for gradient, rtol in (("naive", 1e-10), ("adjoint", 1e-3)):
        _, other = field_gradients(field, y0, [0.0, 1.0], gradient=gradient, **kwargs)
        assert_relative(other, mali, rtol)


@pytest.mark.parametrize("mode", ["graph", "xla"])
@pytest.mark.slow_variants
def test_mali_in_graphs_equals_eager(mode):
    field, y0 = NestedField(), nested_y0()
    kwargs = dict(method="alf", gradient="mali", rtol=1e-4, atol=1e-4)
    n, expected = field_gradients(field, y0, NESTED_TS, **kwargs)
    n_graph, got = field_gradients(field, y0, NESTED_TS, mode=mode, **kwargs)
    assert n_graph == n
    assert_relative(got, expected, 1e-9)


def test_mali_float32_gradient_is_close_to_float64():
    field64, field32 = NestedField(tf.float64), NestedField(tf.float32)
    kwargs = dict(method="alf", gradient="mali", step_size=0.02)
    _, g64 = field_gradients(field64, nested_y0(tf.float64), NESTED_TS, **kwargs)
    _, g32 = field_gradients(field32, nested_y0(tf.float32), NESTED_TS, **kwargs)
    assert_relative(g32, g64, 1e-4)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("times", ["shared", "rows"])
def test_mali_with_interpolated_outputs_equals_backprop_through_the_same_steps(times,
                                                                            per_sample):
    # Fixed steps: the naive gradient is backpropagation through exactly these ALF steps
    # and the Hermite interpolant of each (no step-size selection to differentiate).
    reference = mlp_gradients("naive", MLP_TIMES[times], method="alf", step_size=0.05,
                           per_sample=per_sample)
    mali = mlp_gradients("mali", MLP_TIMES[times], method="alf", step_size=0.05, per_sample=per_sample)
    assert_relative(mali, reference, 1e-9, names=GRADIENT_NAMES, floor=1.0)


def test_mali_adaptive_with_interpolated_outputs_is_close_to_aca_on_the_same_problem():
    # Adaptive ALF takes other steps than Dopri5: the two gradients agree to the
    # solvers' accuracy, and MALI's to its own forward solve's. Compiled loops: eagerly,
    # ALF's thousands of steps at rtol 1e-7 ran op by op for two minutes.
    mali = mlp_gradients("mali", MLP_TIMES["shared"], method="alf", rtol=1e-7, jit_compile=True)
    aca = mlp_gradients("aca", MLP_TIMES["shared"], rtol=1e-9, jit_compile=True)
    assert_relative(mali, aca, 1e-3, names=GRADIENT_NAMES, floor=1.0)


# --------------------------------------------------------------------------------------
# A state component that starts at zero
# --------------------------------------------------------------------------------------


def test_mali_state_component_starting_at_zero():
    """MALI with a state component that starts at exactly 0 (a log-density, a zero
    hidden state): the check of the rebuilt start compares at the scale the states
    reach, so the valid solve is no longer refused, and its gradient matches naive
    backprop through the same ALF solve."""
    W = tf.constant(np.random.RandomState(0).randn(3, 3) * 0.5)

    def func(t, y):
        h, logp = y
        dh = tf.tanh(tf.linalg.matvec(W, h))
        return dh, -tf.reduce_sum(dh * h, axis=-1, keepdims=True)

    y0 = (f64(np.random.RandomState(1).randn(4, 3)), tf.zeros([4, 1], F64))
    grads = {}
    for mode in ("mali", "naive"):
        with tf.GradientTape() as tape:
            tape.watch(y0)
            ys = tfaca.odeint(func, y0, [0.0, 1.0], method="alf", gradient=mode,
                              step_size=0.05)
            loss = tf.reduce_sum(ys[1][-1]) + tf.reduce_sum(ys[0][-1] ** 2)
        grads[mode] = tape.gradient(loss, y0)
    for mali, naive in zip(grads["mali"], grads["naive"]):
        np.testing.assert_allclose(mali.numpy(), naive.numpy(), rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 0.5, 1.5, -1.0, "1"])
def test_bad_damping_is_refused(value):
    with pytest.raises(ValueError, match="damping"):
        tfaca.ALF(damping=value)


def test_mali_second_derivative_raises():
    field, y0 = NestedField(), nested_y0()
    x = tf.Variable(y0[0])
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            ys = tfaca.odeint(field, (x, y0[1]), [0.0, 1.0], method="alf", gradient="mali")
            loss = tf.reduce_sum(ys[0] ** 2)
        g = inner.gradient(loss, x)
        penalty = tf.reduce_sum(g ** 2)
    with pytest.raises(NotImplementedError, match="MALI"):
        outer.gradient(penalty, x)

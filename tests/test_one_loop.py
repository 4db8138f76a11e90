"""The one loop (issue 26): every gradient strategy with every output mode.

Outputs are saved inside the loop from each accepted step's interpolant, and every
replaying strategy pulls their cotangents back inside the step that covers them. These
tests check the combinations that the loop made possible against an independent
gradient of the same computation:

- the checkpoint budget against full ACA (the same replay of the same steps: equal to
  rounding), with interpolated outputs, shared and per-sample steps and times;
- MALI with interpolated outputs against backpropagation through the same ALF steps and
  interpolations (fixed steps, where the naive gradient is exactly that);
- ACA with per-sample steps and interpolated outputs against the same backpropagation;
- the defaults compose: `gradient="mali"` and `ACAGradient(checkpoints=K)` with the
  default `interpolate=True` and with `per_sample=True`.
"""

import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import assert_relative

_RNG = np.random.default_rng(26)
_W = _RNG.normal(size=(4, 4)) * 0.5
_B = _RNG.normal(size=(4,))
_Y0 = _RNG.normal(size=(3, 4))
_ROWS = [[0.0, 0.4, 0.9, 1.3], [0.0, 0.2, 1.1, 1.1], [0.0, 0.5, 0.7, 1.0]]
_TIMES = {
    "shared": [0.0, 0.1, 0.35, 0.7, 1.0, 1.3],
    "decreasing": [1.3, 1.0, 0.7, 0.35, 0.1, 0.0],
    "rows": _ROWS,
}


def _gradients(gradient, ts, *, method="dopri5", per_sample=False, step_size=None,
               interpolate=True, rtol=1e-6, jit_compile="auto"):
    """Outputs and dL/d(y0, ts, W, b) of a float64 solve of a time-dependent MLP field."""
    w, b = tf.Variable(_W), tf.Variable(_B)

    def func(t, y):
        t = tf.convert_to_tensor(t)
        scale = 1.0 + 0.1 * (t if t.shape.rank == 0 else t[:, None])
        return tf.tanh(y @ w + b) * scale - 0.1 * y

    y0 = tf.constant(_Y0)
    ts = tf.constant(ts, tf.float64)
    n = ts.shape[-1]
    c = tf.constant(np.sin(np.arange(n * 12) * 1.7).reshape(n, 3, 4))
    with tf.GradientTape() as tape:
        tape.watch([y0, ts])
        sol = tfaca.solve(func, y0, ts, method=method, gradient=gradient, rtol=rtol, atol=1e-8,
                          step_size=step_size, per_sample=per_sample, interpolate=interpolate,
                          max_steps=5000, jit_compile=jit_compile)
        loss = tf.reduce_sum(c * sol.ys)
    grads = tape.gradient(loss, [y0, ts, w, b])
    return [sol.ys.numpy()] + [g.numpy() for g in grads]


NAMES = ["ys", "y0", "ts", "W", "b"]  # what `_gradients` returns


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("times", sorted(_TIMES))
def test_budget_with_interpolated_outputs_equals_full_aca(times, per_sample):
    full = _gradients("aca", _TIMES[times], per_sample=per_sample)
    for budget in (1, 2, 5):
        kept = _gradients(tfaca.ACAGradient(checkpoints=budget), _TIMES[times],
                          per_sample=per_sample)
        assert_relative(kept, full, 1e-12, names=NAMES, floor=1.0)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("times", ["shared", "rows"])
def test_mali_with_interpolated_outputs_equals_backprop_through_the_same_steps(times,
                                                                            per_sample):
    # Fixed steps: the naive gradient is backpropagation through exactly these ALF steps
    # and the Hermite interpolant of each (no step-size selection to differentiate).
    reference = _gradients("naive", _TIMES[times], method="alf", step_size=0.05,
                           per_sample=per_sample)
    mali = _gradients("mali", _TIMES[times], method="alf", step_size=0.05, per_sample=per_sample)
    assert_relative(mali, reference, 1e-9, names=NAMES, floor=1.0)


@pytest.mark.parametrize("method,step_size", [("dopri5", 0.05), ("rk4", 0.05), ("bosh3", 0.05)])
@pytest.mark.parametrize("times", ["shared", "rows"])
def test_aca_per_sample_with_interpolated_outputs_equals_backprop(times, method, step_size):
    reference = _gradients("naive", _TIMES[times], method=method, step_size=step_size,
                           per_sample=True)
    aca = _gradients("aca", _TIMES[times], method=method, step_size=step_size, per_sample=True)
    assert_relative(aca, reference, 1e-10, names=NAMES, floor=1.0)


def test_mali_adaptive_with_interpolated_outputs_is_close_to_aca_on_the_same_problem():
    # Adaptive ALF takes other steps than Dopri5: the two gradients agree to the
    # solvers' accuracy, and MALI's to its own forward solve's. Compiled loops: eagerly,
    # ALF's thousands of steps at rtol 1e-7 ran op by op for two minutes.
    mali = _gradients("mali", _TIMES["shared"], method="alf", rtol=1e-7, jit_compile=True)
    aca = _gradients("aca", _TIMES["shared"], rtol=1e-9, jit_compile=True)
    assert_relative(mali, aca, 1e-3, names=NAMES, floor=1.0)


@pytest.mark.parametrize("gradient", ["mali", "budget"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_memory_knobs_accept_the_default_outputs(gradient, per_sample):
    """`odeint(f, y0, ts, method="alf", gradient="mali")` and a checkpoint budget take
    the default `interpolate=True` with more than two times, in a `tf.function` too."""
    method = "alf" if gradient == "mali" else "dopri5"
    strategy = "mali" if gradient == "mali" else tfaca.ACAGradient(checkpoints=3)
    y0 = tf.constant(_Y0)
    ts = tf.constant(_TIMES["shared"], tf.float64)
    w = tf.Variable(_W)

    @tf.function
    def run():
        with tf.GradientTape() as tape:
            ys = tfaca.odeint(lambda t, y: tf.tanh(y @ w), y0, ts, method=method,
                              gradient=strategy, per_sample=per_sample, rtol=1e-4)
            loss = tf.reduce_sum(ys ** 2)
        return ys, tape.gradient(loss, w)

    ys, g = run()
    assert ys.shape == (6, 3, 4)
    assert np.all(np.isfinite(ys.numpy())) and np.all(np.isfinite(g.numpy()))

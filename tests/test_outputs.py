"""Outputs (`tfaca._outputs`): interpolated from each accepted step's dense output, or
stepped onto: the steps do not depend on the number of outputs, the interpolants have
their order, and outputs cost no extra evaluations of `func`."""

import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

import tfaca
from helpers import A_NP, F64, linear_exact, linear_func, random_y0


# --------------------------------------------------------------------------------------
# Steps, accuracy, order
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [
    "dopri5", "bosh3", pytest.param("tsit5", marks=pytest.mark.slow),
    pytest.param("heun_euler", marks=pytest.mark.slow)])
def test_steps_do_not_depend_on_number_of_outputs(method):
    func = linear_func(A_NP)
    y0 = random_y0()
    stats, checkpoints = [], []
    for n in (2, 20, 200, 1000):
        sol = tfaca.solve(func, y0, np.linspace(0.0, 5.0, n), method=method, rtol=1e-4,
                          atol=1e-6, max_steps=5000)
        stats.append((int(sol.stats.num_steps), int(sol.stats.num_rejected),
                      int(sol.stats.num_fevals)))
        checkpoints.append(float(sol.ys[-1][0]))
    assert len(set(stats)) == 1, stats
    # The end state is the same solve at every count: with two times it is the last
    # step's end, with more it is read from the last step's interpolant at theta = 1,
    # which is that end to rounding.
    np.testing.assert_allclose(checkpoints, checkpoints[0], rtol=2e-14, atol=0)


@pytest.mark.slow
def test_stepping_onto_outputs_still_available():
    func = linear_func(A_NP)
    ts = np.linspace(0.0, 5.0, 200)
    dense = tfaca.solve(func, random_y0(), ts, rtol=1e-6, atol=1e-8)
    landing = tfaca.solve(func, random_y0(), ts, rtol=1e-6, atol=1e-8, interpolate=False)
    assert int(landing.stats.num_steps) >= 199 > int(dense.stats.num_steps)
    exact = linear_exact(random_y0(), ts)
    for sol in (dense, landing):
        np.testing.assert_allclose(sol.ys.numpy(), exact, atol=2e-5)


# Tolerance of the solve, and the error allowed at the interpolated outputs.
_ACCURACY = {"dopri5": (1e-9, 1e-7), "tsit5": (1e-9, 1e-7), "bosh3": (1e-7, 3e-6),
             "heun_euler": (1e-5, 3e-4)}


@pytest.mark.parametrize("method", ["dopri5", pytest.param("tsit5", marks=pytest.mark.slow),
                                    pytest.param("bosh3", marks=pytest.mark.slow),
                                    pytest.param("heun_euler", marks=pytest.mark.slow)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.slow_variants
def test_interpolated_outputs_match_expm(method, reverse):
    ts = np.linspace(0.0, 4.0, 401)
    if reverse:
        ts = ts[::-1].copy()
    tol, error = _ACCURACY[method]
    sol = tf.function(lambda: tfaca.solve(linear_func(A_NP), random_y0(), ts, method=method, rtol=tol,
                                          atol=tol / 100, max_steps=20000))()
    # Interior outputs fall inside steps (not on their ends): fewer steps than outputs
    # for the higher-order methods.
    if method in ("dopri5", "tsit5"):
        assert int(sol.stats.num_steps) < 400
    np.testing.assert_allclose(sol.ys.numpy(), linear_exact(random_y0(), ts), rtol=0, atol=error)


# Local interpolation error at theta = 0.37 of one step of size h from the exact state:
# O(h^(q + 1)) for an interpolant of order q (4 for Dopri5/Tsit5; cubic Hermite 3, but
# its local error is O(h^4) when the step's end is that accurate).
@pytest.mark.parametrize("method,slope", [("dopri5", 5), ("tsit5", 5), ("bosh3", 4), ("rk4", 4)])
def test_interpolant_order(method, slope):
    func = lambda t, y: tf.stack([y[1], -tf.sin(y[0])])  # pendulum: non-polynomial  # noqa: E731
    y0 = tf.constant([1.0, 0.2], F64)
    hs = np.array([0.4, 0.2, 0.1, 0.05])
    errors = []
    for h in hs:
        t_mid = 0.37 * h
        sol = tfaca.solve(func, y0, [0.0, t_mid, h], method=method, step_size=h)
        assert int(sol.stats.num_steps) == 1
        ref = scipy.integrate.solve_ivp(lambda t, y: [y[1], -np.sin(y[0])], (0, t_mid), y0.numpy(),
                                        rtol=1e-13, atol=1e-14).y[:, -1]
        errors.append(np.linalg.norm(sol.ys.numpy()[1] - ref))
    fitted = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert fitted > slope - 0.3, (fitted, errors)


def test_no_extra_evaluations_for_outputs():
    """Outputs cost no evaluation of func in the forward pass."""
    calls = []

    def func(t, y):
        calls.append(1)
        return tf.linalg.matvec(tf.constant(A_NP), y)

    counts = []
    for n in (2, 50, 500):
        sol = tfaca.solve(func, random_y0(), np.linspace(0.0, 5.0, n), rtol=1e-6, atol=1e-8)
        counts.append(int(sol.stats.num_fevals))
    assert counts[0] == counts[1] == counts[2], counts

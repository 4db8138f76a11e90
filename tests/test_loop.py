"""The loop (`tfaca._loop`, `_control`, `Solution`): numerical failures reported with
their status (max steps, step-size underflow, non-finite values), and the loop at the
limits of its arithmetic and its buffers: what "the same time" means on short time
scales, far from t = 0 and in reverse, and results that do not depend on `max_steps` or
on XLA."""

import re

import numpy as np
import pytest
import tensorflow as tf

import tfaca
from tfaca import _loop, _record
from helpers import A_NP, COMPILED_RTOL, F64, Y0_NP, assert_relative, f64, linear_func, random_y0, van_der_pol


# --------------------------------------------------------------------------------------
# Failed solves: each reports its status, raises or returns NaN as asked
# --------------------------------------------------------------------------------------


def _unit_decay(t, y):
    return -y


def test_max_steps_reached_eager():
    with pytest.raises(tfaca.SolveError, match="max_steps") as info:
        tfaca.solve(_unit_decay, f64([1.0]), f64([0.0, 10.0]), rtol=1e-10, atol=1e-10, max_steps=5)
    assert "MAX_STEPS_REACHED" in str(info.value)
    assert isinstance(info.value, RuntimeError)
    # It says where the solve stopped: t is a number strictly inside (0, 10).
    t = float(re.search(r"t=([-0-9.e+]+)", str(info.value)).group(1))
    assert 0.0 < t < 10.0


def test_max_steps_reached_in_function():
    @tf.function
    def run(y0, ts):
        return tfaca.odeint(_unit_decay, y0, ts, rtol=1e-10, atol=1e-10, max_steps=5)

    with pytest.raises(tf.errors.InvalidArgumentError, match="max_steps"):
        run(f64([1.0]), f64([0.0, 10.0]))
    # The same graph succeeds when the values allow it: the check is at run time.
    ys = run(f64([1.0]), f64([0.0, 1e-3]))
    np.testing.assert_allclose(ys.numpy()[-1], np.exp(-1e-3), rtol=1e-9)


def test_max_steps_reached_status_without_throw():
    ts = f64([0.0, 0.01, 5.0, 10.0])
    sol = tfaca.solve(_unit_decay, f64([1.0]), ts, rtol=1e-10, atol=1e-10, max_steps=8, throw=False)
    assert int(sol.status) == int(tfaca.Status.MAX_STEPS_REACHED)
    assert int(sol.stats.num_steps) + int(sol.stats.num_rejected) == 8
    ys = sol.ys.numpy()[:, 0]
    np.testing.assert_allclose(ys[:2], np.exp(-ts.numpy()[:2]), rtol=1e-8)
    assert np.all(np.isnan(ys[2:]))
    assert 0.01 <= float(sol.t_final) < 5.0


def _square(t, y):
    """y' = y^2, y(0) = 1: y = 1 / (1 - t) blows up at t = 1."""
    return y * y


@pytest.mark.parametrize("dtype", [tf.float64, tf.float32])
@pytest.mark.slow_variants
def test_blow_up_underflows_the_step(dtype):
    """Approaching the singularity the error control shrinks the step until it no longer
    advances time: DT_UNDERFLOW (the state stays finite up to there)."""
    y0, ts = tf.constant([1.0], dtype), tf.constant([0.0, 0.5, 2.0], dtype)
    with pytest.raises(tfaca.SolveError, match="underflow") as info:
        tfaca.solve(_square, y0, ts)
    assert "DT_UNDERFLOW" in str(info.value)
    assert "singularity" in str(info.value)

    sol = tfaca.solve(_square, y0, ts, throw=False)
    assert int(sol.status) == int(tfaca.Status.DT_UNDERFLOW)
    assert 0.99 < float(sol.t_final) <= 1.0
    ys = sol.ys.numpy()[:, 0]
    np.testing.assert_allclose(ys[1], 2.0, rtol=1e-2)  # y(0.5) = 2, reached
    assert np.isnan(ys[2])
    t = float(re.search(r"t=([-0-9.e+]+)", str(info.value)).group(1))
    assert t == pytest.approx(float(sol.t_final), rel=1e-6)


def test_blow_up_in_function():
    @tf.function
    def run(y0, ts):
        return tfaca.odeint(_square, y0, ts)

    with pytest.raises(tf.errors.InvalidArgumentError, match="DT_UNDERFLOW"):
        run(f64([1.0]), f64([0.0, 2.0]))


def _nan_after_half(t, y):
    return tf.where(t > 0.5, tf.constant(np.nan, y.dtype) * y, -y)


def test_nonfinite_derivative_adaptive():
    ts = f64([0.0, 0.25, 1.0])
    with pytest.raises(tfaca.SolveError, match="non-finite") as info:
        tfaca.solve(_nan_after_half, f64([1.0]), ts)
    assert "NONFINITE" in str(info.value)

    sol = tfaca.solve(_nan_after_half, f64([1.0]), ts, throw=False)
    assert int(sol.status) == int(tfaca.Status.NONFINITE)
    assert 0.49 < float(sol.t_final) <= 0.5
    ys = sol.ys.numpy()[:, 0]
    np.testing.assert_allclose(ys[1], np.exp(-0.25), rtol=1e-5)
    assert np.isnan(ys[2])


def test_nonfinite_at_start():
    sol = tfaca.solve(
        lambda t, y: y * np.nan, f64(Y0_NP), f64([0.0, 1.0]), throw=False
    )
    assert int(sol.status) == int(tfaca.Status.NONFINITE)
    assert int(sol.stats.num_steps) == 0
    np.testing.assert_array_equal(sol.ys[0].numpy(), Y0_NP)
    assert np.all(np.isnan(sol.ys[1].numpy()))
    with pytest.raises(tfaca.SolveError, match="NONFINITE"):
        tfaca.solve(lambda t, y: y * np.nan, f64(Y0_NP), f64([0.0, 1.0]))


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_nonfinite_fixed_step(method):
    ts = f64([0.0, 0.25, 1.0])
    with pytest.raises(tfaca.SolveError, match="NONFINITE"):
        tfaca.solve(_nan_after_half, f64([1.0]), ts, method=method, step_size=0.125)
    sol = tfaca.solve(
        _nan_after_half, f64([1.0]), ts, method=method, step_size=0.125, throw=False
    )
    assert int(sol.status) == int(tfaca.Status.NONFINITE)
    # The step from 0.375 ends on 0.5 (finite: NaN only for t > 0.5); the next fails.
    assert float(sol.t_final) == 0.5
    np.testing.assert_allclose(sol.ys.numpy()[1, 0], np.exp(-0.25), rtol=1e-3)
    assert np.isnan(sol.ys.numpy()[2, 0])


def test_nonfinite_in_function():
    @tf.function
    def run(y0, ts):
        return tfaca.odeint(_nan_after_half, y0, ts)

    with pytest.raises(tf.errors.InvalidArgumentError, match="NONFINITE"):
        run(f64([1.0]), f64([0.0, 1.0]))
    ys = run(f64([1.0]), f64([0.0, 0.4]))
    np.testing.assert_allclose(ys.numpy()[-1], np.exp(-0.4), rtol=1e-4)


@pytest.mark.parametrize(
    "func, kwargs, status",
    [
        (_unit_decay, dict(rtol=1e-10, atol=1e-10, max_steps=6), tfaca.Status.MAX_STEPS_REACHED),
        (_square, dict(), tfaca.Status.DT_UNDERFLOW),
        (_nan_after_half, dict(), tfaca.Status.NONFINITE),
    ],
)
@pytest.mark.slow_variants
def test_xla_reports_status_and_nan(func, kwargs, status):
    ts = f64([0.0, 0.01, 3.0, 4.0])

    @tf.function(jit_compile=True)
    def run(y0, ts):
        sol = tfaca.solve(func, y0, ts, **kwargs)  # throw=True: XLA cannot assert
        return sol.ys, sol.status, sol.t_final

    ys, code, t_final = run(f64([1.0]), ts)
    assert int(code) == int(status)
    ys = ys.numpy()[:, 0]
    assert ys[0] == 1.0 and np.isfinite(ys[1])  # reached
    assert np.all(np.isnan(ys[2:]))  # unreached: NaN, not a stale state
    assert float(t_final) < 3.0

    # The same compiled function succeeds on a reachable problem.
    ys, code, _ = run(f64([1.0]), f64([0.0, 1e-4, 2e-4, 3e-4]))
    assert int(code) == 0 and np.all(np.isfinite(ys.numpy()))


def test_throw_false_in_function_returns_status():
    @tf.function
    def run(y0, ts):
        sol = tfaca.solve(_square, y0, ts, throw=False)
        return sol.ys, sol.status

    ys, code = run(f64([1.0]), f64([0.0, 0.5, 2.0]))
    assert int(code) == int(tfaca.Status.DT_UNDERFLOW)
    assert np.isfinite(ys.numpy()[1, 0]) and np.isnan(ys.numpy()[2, 0])


def test_status_messages():
    assert tfaca.Status.SUCCESS == 0
    for status in tfaca.Status:
        assert isinstance(status.message, str) and status.message
    assert "max_steps" in tfaca.Status.MAX_STEPS_REACHED.message


def test_status_prints_its_name_and_names_a_status_tensor():
    status = tfaca.Status.MAX_STEPS_REACHED
    assert str(status) == f"{status}" == "MAX_STEPS_REACHED" and int(status) == 1
    assert f"{tfaca.Status.SUCCESS:>9}" == "  SUCCESS"
    sol = tfaca.solve(lambda t, y: y * y, f64([[1.0], [0.1]]), [0.0, 2.0], per_sample=True,
                      throw=False)
    assert tfaca.Status.name_of(sol.status) == ["DT_UNDERFLOW", "SUCCESS"]
    sol = tfaca.solve(linear_func(A_NP), f64(Y0_NP), f64([0.0, 1.0]))
    assert tfaca.Status.name_of(sol.status) == "SUCCESS"
    assert tfaca.Status.name_of(np.array([[3], [1]])) == [["NONFINITE"], ["MAX_STEPS_REACHED"]]
    assert tfaca.Status.name_of(2) == "DT_UNDERFLOW"
    with pytest.raises(TypeError, match="`status` must be a value"):
        tf.function(tfaca.Status.name_of)(tf.constant(0))


def test_max_steps_below_the_number_of_outputs_says_so():
    with pytest.raises(ValueError, match=r"len\(ts\) - 1 = 9.*max_steps=5"):
        tfaca.odeint(lambda t, y: -y, f64([1.0]), f64(np.linspace(0, 1, 10)), max_steps=5,
                     interpolate=False)
    # Interpolated outputs cost no steps: the same call succeeds.
    ys = tfaca.odeint(lambda t, y: -y, f64([1.0]), f64(np.linspace(0, 1, 10)), max_steps=5)
    np.testing.assert_allclose(ys.numpy()[:, 0], np.exp(-np.linspace(0, 1, 10)), rtol=1e-3)


def test_non_monotone_times_under_xla_are_reported():
    """XLA cannot assert: times that are not monotone give status NONFINITE and NaN
    outputs instead of a solve to the wrong times."""

    @tf.function(jit_compile=True)
    def run(ts):
        sol = tfaca.solve(lambda t, y: -y, f64([1.0]), ts)
        return sol.ys, sol.status

    ys, status = run(f64([0.0, 1.0, 0.5]))
    assert int(status) == int(tfaca.Status.NONFINITE)
    assert np.all(np.isnan(ys.numpy()[1:]))
    ys, status = run(f64([0.0, 0.5, 1.0]))
    assert int(status) == 0
    np.testing.assert_allclose(ys.numpy()[:, 0], np.exp([0.0, -0.5, -1.0]), rtol=2e-3)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_failure_before_the_first_step_gives_nan_outputs(mode):
    """A solve that fails before accepting any step reports it, and every interpolated
    output after the start is NaN, never y0 repeated."""

    def func(t, y):
        return y * tf.constant(float("nan"), F64)

    ts = np.linspace(0.0, 1.0, 7)
    run = lambda: tfaca.solve(func, random_y0(), ts, throw=False)  # noqa: E731
    if mode == "xla":
        run = tf.function(run, jit_compile=True)
    sol = run()
    assert int(sol.status) == int(tfaca.Status.NONFINITE)
    assert int(sol.stats.num_steps) == 0
    np.testing.assert_array_equal(sol.ys.numpy()[0], random_y0().numpy())
    assert np.all(np.isnan(sol.ys.numpy()[1:]))


# --------------------------------------------------------------------------------------
# Short time scales in float32: "the same time" is relative to the times involved
# --------------------------------------------------------------------------------------


def _decay(rate):
    return lambda t, y: -rate * y


def _solve(func, y0, ts, dtype, **kwargs):
    return tfaca.solve(
        func, tf.constant(y0, dtype), tf.constant(ts, dtype), throw=False, **kwargs
    )


def _ok(sol):
    assert int(sol.status) == int(tfaca.Status.SUCCESS), tfaca.Status(int(sol.status)).name


_SHORT_TS = np.linspace(0.0, 3e-7, 7)


def test_fast_decay_on_a_short_time_scale_solves_in_float32_as_in_float64():
    """y' = -1e8 y over [0, 3e-7]: steps of ~1e-8 are ordinary steps, not underflow, in
    float32 as in float64 (and scipy's solve_ivp, 19 steps over [0, 3e-7])."""
    sols = {d: _solve(_decay(1e8), [1.0], _SHORT_TS, d) for d in (tf.float32, tf.float64)}
    for sol in sols.values():
        _ok(sol)
    steps = {d: int(s.stats.num_steps) for d, s in sols.items()}
    assert abs(steps[tf.float32] - steps[tf.float64]) <= 2, steps
    assert steps[tf.float32] >= 10, steps  # not landing on each output in one step
    exact = np.exp(-1e8 * _SHORT_TS)
    ys = sols[tf.float32].ys.numpy()[:, 0]
    # Global error within a few units of the local tolerance atol + rtol |y|.
    np.testing.assert_array_less(np.abs(ys - exact), 5 * (1e-6 + 1e-3 * exact))
    np.testing.assert_allclose(ys, sols[tf.float64].ys.numpy()[:, 0], rtol=0, atol=1e-6)


def test_first_step_is_respected_on_a_short_time_scale():
    """first_step=1e-8 is the first trial step: its first stage is at t0 + c[1] * 1e-8,
    and, accurate enough on y' = -1e7 y to be accepted, it is the first recorded step."""
    dtype = tf.float32
    first_step = tf.constant(1e-8, dtype)
    times = []

    def func(t, y):
        times.append(float(t))
        return [-1e7 * y[0]]

    ts = tf.constant([0.0, 3e-7], dtype)
    controller = tfaca.StepSizeController(
        rtol=[tf.constant(1e-3, dtype)], atol=[tf.constant(1e-6, dtype)]
    )
    traj = _loop.integrate(
        tfaca.Dopri5(), controller, func, ts, [tf.constant([1.0], dtype)],
        step_size=None, first_step=first_step, max_steps=1000, record=True,
    )
    assert int(traj.status) == 0
    c1 = tfaca.Dopri5.tableau.c[1]
    assert times[1] == pytest.approx(c1 * 1e-8, rel=1e-6)
    assert float(traj.checkpoints.dt[0, 0]) == float(first_step)
    assert int(traj.stats.num_steps) >= 2


def test_transient_at_zero_in_a_long_interval_float32():
    """y' = -y / (t + 1e-8) over [0, 1]: steps start near 1e-9 and grow with t. A step
    far below the ulps of the last output (1.0) is not an underflow while |t| is small."""
    ts = np.array([0.0, 1e-8, 1e-7, 1e-6, 1.0])
    func = lambda t, y: -y / (t + 1e-8)  # noqa: E731
    sols = {
        d: _solve(func, [1.0], ts, d, rtol=1e-5, atol=1e-9) for d in (tf.float32, tf.float64)
    }
    for sol in sols.values():
        _ok(sol)
    exact = 1e-8 / (ts + 1e-8)
    np.testing.assert_allclose(sols[tf.float32].ys.numpy()[:, 0], exact, rtol=1e-4)
    steps = [int(s.stats.num_steps) for s in sols.values()]
    assert abs(steps[0] - steps[1]) <= 2, steps


def test_blow_up_is_located_on_a_short_time_scale_float32():
    """y' = y^2, y(0) = 1e8 blows up at t = 1e-8: DT_UNDERFLOW there, not at t = 0."""
    sol = _solve(lambda t, y: y * y, [1e8], [0.0, 2e-8], tf.float32)
    assert int(sol.status) == int(tfaca.Status.DT_UNDERFLOW)
    assert 0.99e-8 < float(sol.t_final) <= 1e-8


@pytest.mark.parametrize(
    "dtype, t0, h",
    [
        (tf.float32, 0.0, 1e-7),  # 3 steps of float32(1e-7) end ~1 ulp short of 3e-7
        (tf.float32, 0.0, -1e-7),
        (tf.float64, 0.0, 1e-7),
        (tf.float32, 1.0, 0.1),
        (tf.float32, 1e6, 2.0),
        (tf.float64, 1e6, 1e-3),
        (tf.float64, -1e6, -1e-3),
    ],
)
def test_no_sliver_step_before_an_output(dtype, t0, h):
    """Steps capped at h reach t0 + 3h a few ulps short of the output: the third step
    lands on it rather than leaving a sliver step of a few ulps."""
    ts = [t0, t0 + 3 * h]
    step = tf.constant(abs(h), dtype)
    # y' = 0: no error, every step is accepted and as long as the cap allows.
    sol = _solve(_decay(0.0), [1.0], ts, dtype, first_step=step, max_step=step)
    _ok(sol)
    assert int(sol.stats.num_steps) == 3
    assert float(sol.t_final) == float(tf.constant(ts[-1], dtype))


@pytest.mark.parametrize("factor_max", [10.0, 2.0])
def test_capped_steps_land_on_short_time_scale_outputs_float32(factor_max):
    """Steps capped at 1e-8 over [0, 1e-7, 2e-7] in float32: the cap is kept (at least
    20 steps), landing on 1e-7 with a remainder of a few ulps neither ends the solve with
    a spurious DT_UNDERFLOW nor restarts it from a tiny step (at most 22 steps)."""
    h = tf.constant(1e-8, tf.float32)
    sol = _solve(
        _decay(1e7), [1.0], [0.0, 1e-7, 2e-7], tf.float32, first_step=h, max_step=h,
        factor_max=factor_max,
    )
    _ok(sol)
    assert 20 <= int(sol.stats.num_steps) <= 22, int(sol.stats.num_steps)
    np.testing.assert_allclose(sol.ys.numpy()[:, 0], np.exp(-1e7 * np.array([0, 1e-7, 2e-7])),
                               rtol=1e-4)


@pytest.mark.parametrize(
    "ts, expected_steps",
    [
        ([0.0, 3e-7], 30),
        ([3e-7, 0.0], 30),
        ([0.0, 1e-7, 2.5e-7], 25),
        ([1e-7, -1e-7], 20),
        # 17 and 19 steps of float32(1e-8) end 1 ulp short of the output: no 18th/20th.
        ([0.0, 1.7e-7], 17),
        ([1e-7, -9e-8], 19),
    ],
)
def test_fixed_steps_land_on_a_short_time_scale_float32(ts, expected_steps):
    """A fixed step of 1e-8 in float32 takes ceil(interval / 1e-8) steps per interval and
    ends exactly on each output."""
    sol = _solve(_decay(1e7), [1.0], ts, tf.float32, method="rk4", step_size=1e-8)
    _ok(sol)
    assert int(sol.stats.num_steps) == expected_steps
    assert float(sol.t_final) == float(tf.constant(ts[-1], tf.float32))
    np.testing.assert_allclose(
        sol.ys.numpy()[:, 0], np.exp(-1e7 * (np.array(ts) - ts[0])), rtol=1e-4
    )


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_reverse_time_on_a_short_time_scale(dtype):
    """Backwards from 3e-7 (and across 0) the steps and results mirror the forward solve."""
    forward = _solve(_decay(1e8), [1.0], [0.0, 1e-7, 3e-7], dtype)
    reverse = _solve(_decay(-1e8), [1.0], [3e-7, 2e-7, 0.0], dtype)
    across = _solve(_decay(-1e8), [1.0], [1e-7, 0.0, -2e-7], dtype)
    for sol in (forward, reverse, across):
        _ok(sol)
        assert abs(int(sol.stats.num_steps) - int(forward.stats.num_steps)) <= 1
        np.testing.assert_allclose(
            sol.ys.numpy()[:, 0], np.exp(-1e8 * np.array([0, 1e-7, 3e-7])), rtol=0, atol=2e-6
        )


# --------------------------------------------------------------------------------------
# Far from t = 0
# --------------------------------------------------------------------------------------


def test_small_steps_far_from_zero_match_the_same_solve_at_zero():
    """Around t = 1e6 (float64, ulp 1.2e-10) steps of ~1e-5 work as they do at t = 0."""
    offsets = np.array([0.0, 1e-4, 3e-4])
    at_zero = _solve(_decay(1e4), [1.0], offsets, tf.float64)
    far = _solve(_decay(1e4), [1.0], 1e6 + offsets, tf.float64)
    _ok(at_zero)
    _ok(far)
    assert int(far.stats.num_steps) == int(at_zero.stats.num_steps)
    # Equal up to the rounding of the step ends at 1e6 (~1e-10, times the rate 1e4).
    np.testing.assert_allclose(far.ys.numpy(), at_zero.ys.numpy(), rtol=0, atol=1e-5)
    exact = np.exp(-1e4 * offsets)
    np.testing.assert_array_less(np.abs(far.ys.numpy()[:, 0] - exact), 5 * (1e-6 + 1e-3 * exact))


def test_steps_of_a_few_ulps_far_from_zero_float32():
    """At t = 1e6 in float32 (ulp 0.0625), steps of ~1 work; steps of ~1e-3 cannot
    advance time, which is reported as DT_UNDERFLOW at once, not after max_steps."""
    ok = _solve(_decay(1.0), [1.0], [1e6, 1e6 + 16.0], tf.float32)
    _ok(ok)
    np.testing.assert_allclose(ok.ys.numpy()[-1, 0], np.exp(-16.0), rtol=1e-3, atol=1e-6)
    stuck = _solve(_decay(1e3), [1.0], [1e6, 1e6 + 1.0], tf.float32)
    assert int(stuck.status) == int(tfaca.Status.DT_UNDERFLOW)
    assert int(stuck.stats.num_rejected) + int(stuck.stats.num_steps) < 10


# --------------------------------------------------------------------------------------
# max_steps sizes buffers under XLA only: results do not depend on it, nor on XLA
# --------------------------------------------------------------------------------------


_Y0 = np.random.default_rng(2).standard_normal((4, 8))
_TS = np.array([0.0, 0.5, 2.0])
_W = np.random.default_rng(1).standard_normal((8, 8)) / 3


def _field(t, y):
    return tf.tanh(y @ tf.constant(_W))


def _trials():
    sol = tfaca.solve(_field, tf.constant(_Y0), tf.constant(_TS), rtol=1e-6, atol=1e-8)
    return int(sol.stats.num_steps) + int(sol.stats.num_rejected)


def _solve_and_gradient(max_steps):
    def run(y0):
        with tf.GradientTape() as tape:
            tape.watch(y0)
            sol = tfaca.solve(
                _field, y0, tf.constant(_TS), rtol=1e-6, atol=1e-8, max_steps=max_steps,
                throw=False,
            )
            loss = tf.reduce_sum(sol.ys[-1] ** 2)
        stats = (sol.stats.num_steps, sol.stats.num_rejected, sol.stats.num_fevals)
        return sol.ys, sol.status, sol.t_final, stats, tape.gradient(loss, y0)

    return run


@pytest.mark.parametrize("size", ["exact", "large"])
@pytest.mark.slow
def test_xla_and_function_agree_whatever_max_steps(size):
    """The solution, statistics, status and ACA gradient are the same under XLA (buffers
    of max_steps entries) and in a plain tf.function (buffers that grow with the steps),
    for max_steps just enough (every buffer entry used) and for a large one."""
    max_steps = _trials() if size == "exact" else 20000
    y0 = tf.constant(_Y0)
    graph = tf.function(_solve_and_gradient(max_steps))(y0)
    xla = tf.function(_solve_and_gradient(max_steps), jit_compile=True)(y0)
    ys_g, status_g, t_g, stats_g, grad_g = graph
    ys_x, status_x, t_x, stats_x, grad_x = xla
    assert int(status_g) == int(status_x) == 0
    assert float(t_g) == float(t_x) == _TS[-1]
    assert [int(s) for s in stats_g] == [int(s) for s in stats_x]
    np.testing.assert_allclose(ys_x.numpy(), ys_g.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_x.numpy(), grad_g.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_xla_and_function_agree_when_max_steps_is_reached():
    """One trial short, both stop at the same time with the same statistics; the output
    not reached is NaN in both."""
    max_steps = _trials() - 1
    y0 = tf.constant(_Y0)
    graph = tf.function(_solve_and_gradient(max_steps))(y0)
    xla = tf.function(_solve_and_gradient(max_steps), jit_compile=True)(y0)
    for _, status, _, _, _ in (graph, xla):
        assert int(status) == int(tfaca.Status.MAX_STEPS_REACHED)
    # The steps agree to rounding (XLA fuses the arithmetic differently).
    assert float(graph[2]) == pytest.approx(float(xla[2]), rel=1e-10)
    assert [int(s) for s in graph[3]] == [int(s) for s in xla[3]]
    for ys in (graph[0], xla[0]):
        assert np.all(np.isnan(ys.numpy()[-1])) and np.all(np.isfinite(ys.numpy()[:2]))


def _checkpoints(max_steps):
    def run(y0):
        dtype = tf.float64
        controller = tfaca.StepSizeController(
            rtol=[tf.constant(1e-6, dtype)], atol=[tf.constant(1e-8, dtype)]
        )
        traj = _loop.integrate(
            tfaca.Dopri5(), controller, lambda t, y: [_field(t, y[0])], tf.constant(_TS),
            [y0], step_size=None, first_step=None, max_steps=max_steps, record=True,
        )
        cp = traj.checkpoints
        return cp.t, cp.dt, cp.interval, cp.hit, cp.y[0], cp.num_steps

    return run


@pytest.mark.parametrize("size", ["exact", "large"])
@pytest.mark.slow_variants
def test_checkpoints_agree_under_xla_and_in_a_function(size):
    """The recorded steps are the same; a tf.function returns only the accepted steps and
    the end of the solve, XLA a static max_steps + 1 entries whose first num_steps + 1
    are those."""
    max_steps = _trials() if size == "exact" else 20000
    y0 = tf.constant(_Y0)
    graph = tf.function(_checkpoints(max_steps))(y0)
    xla = tf.function(_checkpoints(max_steps), jit_compile=True)(y0)
    n = int(graph[-1])
    assert int(xla[-1]) == n > 0
    for g, x in zip(graph[:-1], xla[:-1]):
        assert g.shape[0] == n + 1 and x.shape[0] == max_steps + 1
        assert_relative([x.numpy()[:n + 1]], [g.numpy()], COMPILED_RTOL)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.slow_variants
def test_step_log_of_many_blocks_agrees_under_xla_and_in_a_function(per_sample, monkeypatch):
    """Outside XLA a step's scalars are logged in blocks of 64 steps (`_record._BLOCK`),
    the block being filled carried through the loop; under XLA in one static buffer.
    A stiff Van der Pol solve of several hundred steps, with rejected trials and several
    outputs, records the same steps with blocks of 64 as with blocks of 1 (bit for bit)
    and under XLA (to rounding, which the stiff field amplifies to ~1e-7: XLA fuses the
    arithmetic differently), and they chain:
    t[i] + dt[i] = t[i+1]."""
    dtype = tf.float64
    ts = tf.constant(np.linspace(0.0, 12.0, 5), dtype)
    y0 = tf.constant([[2.0, 0.0], [1.0, 1.0]], dtype)
    max_steps = 3000

    def run(y0):
        controller = tfaca.StepSizeController(rtol=[tf.constant(1e-7, dtype)],
                                        atol=[tf.constant(1e-9, dtype)], per_sample=per_sample)
        traj = _loop.integrate(
            tfaca.Dopri5(), controller, lambda t, y: [van_der_pol(t, y[0], mu=5.0)], ts, [y0],
            step_size=None, first_step=None, max_steps=max_steps, record=True,
            per_sample=per_sample)
        cp = traj.checkpoints
        columns = [cp.t, cp.dt, cp.interval, cp.hit]
        if per_sample:
            columns += [cp.accepted]
        return columns, cp.num_steps, traj.stats.num_rejected

    graph = tf.function(run)(y0)
    xla = tf.function(run, jit_compile=True)(y0)
    monkeypatch.setattr(_record, "_BLOCK", 1)
    unblocked = tf.function(run)(y0)
    n = int(graph[1])
    assert int(xla[1]) == int(unblocked[1]) == n > 4 * 64
    assert np.sum(graph[2].numpy()) > 0  # some trials were rejected
    for g, x, u in zip(graph[0], xla[0], unblocked[0]):
        assert g.shape[0] == n + 1
        np.testing.assert_array_equal(g.numpy(), u.numpy())
        np.testing.assert_allclose(x.numpy()[:n + 1], g.numpy(), rtol=1e-5, atol=1e-8)
    t, dt = graph[0][0].numpy()[:n], graph[0][1].numpy()[:n]
    if not per_sample:
        accepted = np.ones((n, 1), bool)
    else:
        accepted = graph[0][4].numpy()[:n] > 0  # the entries each sample accepted
    for b in range(t.shape[1]):
        t_b, dt_b = t[accepted[:, b], b], dt[accepted[:, b], b]
        np.testing.assert_allclose(t_b[:-1] + dt_b[:-1], t_b[1:], rtol=1e-12, atol=1e-12)
        assert t_b[0] == 0.0 and t_b[-1] + dt_b[-1] == pytest.approx(12.0, rel=1e-14)

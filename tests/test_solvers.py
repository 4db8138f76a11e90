"""The solvers (`tfaca._solvers`, `_tableau`): tableaus, orders of convergence, accuracy
against references, structures, dtypes, compilation modes, tolerances and statistics,
user-defined solvers, and ALF (its order, and its inverse, which MALI relies on)."""

import math

import keras
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

import tfaca
from helpers import (
    A_NP, ADAPTIVE, FIXED, ORDERS, Y0_NP, expm_solution, f64, linear_func, nested_y0,
    NestedField, recorded_trajectory, van_der_pol,
)


# --------------------------------------------------------------------------------------
# Butcher tableaus
# --------------------------------------------------------------------------------------


ALL_METHODS = FIXED + ADAPTIVE
SOLVER_CLASSES = {
    "euler": tfaca.Euler,
    "midpoint": tfaca.Midpoint,
    "rk4": tfaca.RK4,
    "heun_euler": tfaca.HeunEuler,
    "bosh3": tfaca.Bosh3,
    "dopri5": tfaca.Dopri5,
    "tsit5": tfaca.Tsit5,
}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_builtin_tableau_is_consistent(method):
    solver = tfaca.get_solver(method)
    assert isinstance(solver, SOLVER_CLASSES[method])
    tab = solver.tableau
    assert isinstance(tab, tfaca.ButcherTableau)
    assert tab.c[0] == 0.0
    assert len(tab.a_lower) == tab.stages - 1
    for i, row in enumerate(tab.a_lower):
        assert len(row) == i + 1
        assert math.fsum(row) == pytest.approx(tab.c[i + 1], abs=1e-12)
    assert math.fsum(tab.b_sol) == pytest.approx(1.0, abs=1e-12)
    assert solver.order == ORDERS[method]
    if method in ADAPTIVE:
        assert solver.adaptive
        assert len(tab.b_error) == tab.stages
        assert math.fsum(tab.b_error) == pytest.approx(0.0, abs=1e-12)
        assert solver.error_order == solver.order - 1
    else:
        assert not solver.adaptive
        assert tab.b_error is None and solver.error_order is None
    # Rebuilding from the same coefficients passes validation.
    rebuilt = tfaca.ButcherTableau(tab.c, tab.a_lower, tab.b_sol, tab.b_error, tab.b_dense)
    assert rebuilt == tab


def _heun_kwargs():
    return dict(c=(0.0, 1.0), a_lower=((1.0,),), b_sol=(0.5, 0.5), b_error=(-0.5, 0.5))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(c=(0.0, 0.9)), r"sum to c\[1\]"),  # row sum != c
        (dict(a_lower=((0.8,),)), r"sum to c\[1\]"),
        (dict(b_sol=(0.5, 0.6)), r"b_sol.*sum to 1"),
        (dict(b_error=(-0.5, 0.4)), r"b_error.*sum to 0"),
        (dict(a_lower=((0.5, 0.5),)), r"Row 0 of `a_lower` must have 1 entries"),
        (dict(a_lower=()), r"one row per stage"),
        (dict(a_lower=((1.0,), (0.5, 0.5))), r"one row per stage"),
        (dict(b_sol=(1.0,)), r"`b_sol` must have 2 entries"),
        (dict(b_error=(0.0, 0.0, 0.0)), r"`b_error` must have 2 entries"),
        (dict(c=(0.1, 1.0)), r"start with 0"),
        (dict(c=(), a_lower=(), b_sol=(), b_error=None), r"non-empty"),
    ],
)
def test_bad_tableau_raises(change, match):
    kwargs = _heun_kwargs()
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        tfaca.ButcherTableau(**kwargs)


def test_tableau_accepts_fixed_step_without_b_error():
    tab = tfaca.ButcherTableau(c=(0.0, 2 / 3), a_lower=((2 / 3,),), b_sol=(0.25, 0.75))
    assert tab.b_error is None
    assert tab.stages == 2


@pytest.mark.parametrize("method", ALL_METHODS)
def test_fsal_property(method):
    expected = method in ("bosh3", "dopri5", "tsit5")
    assert tfaca.get_solver(method).tableau.fsal is expected


@pytest.mark.parametrize("method", ["bosh3", "dopri5", "tsit5"])
def test_fsal_last_stage_is_derivative_at_end(method):
    """The `f1` a FSAL step returns is func(t0 + dt, y1)."""
    solver = tfaca.get_solver(method)
    func = lambda t, y: [van_der_pol(t, y[0])]  # noqa: E731
    t0, y0, dt = f64(0.3), f64([1.5, -0.7]), f64(0.05)
    y1, f1, _ = solver.step(func, t0, [y0], func(t0, [y0]), dt)
    np.testing.assert_allclose(f1[0].numpy(), func(t0 + dt, y1)[0].numpy(), rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------------------
# Orders of convergence
# --------------------------------------------------------------------------------------


def _slope(hs, errors):
    """Least-squares slope of log(error) against log(h)."""
    return np.polyfit(np.log(hs), np.log(errors), 1)[0]


# Powers of two (steps land exactly on T = 2) in each order's asymptotic regime, with
# the error well above float64 round-off (>= 1e-12).
_STEP_EXPONENTS = {1: range(5, 10), 2: range(3, 8), 3: range(2, 7), 4: range(2, 7), 5: range(2, 6)}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_convergence_order(method):
    order = ORDERS[method]
    T = 2.0
    exact = expm_solution(A_NP, Y0_NP, T)
    func = linear_func(A_NP)

    @tf.function
    def run(h):
        return tfaca.odeint(
            func, f64(Y0_NP), f64([0.0, T]), method=method, step_size=h, max_steps=2000
        )[-1]

    hs = [2.0**-k for k in _STEP_EXPONENTS[order]]
    errors = [np.linalg.norm(run(f64(h)).numpy() - exact) for h in hs]
    assert min(errors) > 1e-12, errors
    slope = _slope(hs, errors)
    assert abs(slope - order) < 0.3, (slope, errors)


@pytest.mark.parametrize("method", ADAPTIVE + ["dopri5-shampine"])
def test_embedded_error_estimate_order(method):
    solver = (tfaca.Dopri5(error_estimate="shampine") if method == "dopri5-shampine"
              else tfaca.get_solver(method))
    func = lambda t, y: [van_der_pol(t, y[0])]  # noqa: E731
    t0, y0 = f64(0.3), f64([1.5, -0.7])
    f0 = func(t0, [y0])
    hs = [0.1 * 2.0**-k for k in range(4)]
    errors = []
    for h in hs:
        y1, _, y_error = solver.step(func, t0, [y0], f0, f64(h))
        assert y_error is not None and len(y_error) == 1
        assert y_error[0].shape == y0.shape
        errors.append(np.linalg.norm(y_error[0].numpy()))
    assert min(errors) > 1e-13
    slope = _slope(hs, errors)
    assert abs(slope - (solver.error_order + 1)) < 0.3, (slope, errors)


@pytest.mark.parametrize("estimate", ["dormand_prince", "shampine"])
def test_dopri5_embedded_solutions_satisfy_the_fourth_order_conditions(estimate):
    """Both of Dopri5's error estimates measure against an embedded solution of order 4
    exactly: `b_sol - b_error` satisfies the eight order conditions up to order 4 (and
    not all of order 5), in exact rational arithmetic's floating image."""
    solver = tfaca.Dopri5(error_estimate=estimate)
    tab = solver.tableau
    assert solver.error_estimate == estimate and solver.error_order == 4
    b = np.array(tab.b_sol) - np.array(tab.b_error)
    s = tab.stages
    a = np.zeros((s, s))
    for i, row in enumerate(tab.a_lower):
        a[i + 1, :len(row)] = row
    c = np.array(tab.c)
    conditions = {
        (b.sum(), 1.0), (b @ c, 1 / 2), (b @ c**2, 1 / 3), (b @ (a @ c), 1 / 6),
        (b @ c**3, 1 / 4), (b @ (c * (a @ c)), 1 / 8), (b @ (a @ c**2), 1 / 12),
        (b @ (a @ (a @ c)), 1 / 24)}
    for value, want in conditions:
        assert value == pytest.approx(want, abs=1e-14)
    assert abs(b @ c**4 - 1 / 5) > 1e-6  # a 4th-order solution, not the 5th-order one
    # The two estimates are different solutions, and the 5th-order solution is the same.
    other = tfaca.Dopri5(error_estimate=({"dormand_prince", "shampine"} - {estimate}).pop())
    assert tab.b_sol == other.tableau.b_sol and tab.b_error != other.tableau.b_error


def test_dopri5_error_estimate_is_checked_named_and_saved():
    with pytest.raises(ValueError, match=r"`error_estimate` must be one of \['dormand_prince', "
                                         r"'shampine'\]. Received: error_estimate='scipy'"):
        tfaca.Dopri5(error_estimate="scipy")
    assert repr(tfaca.Dopri5()) == "Dopri5()"
    assert repr(tfaca.Dopri5("shampine")) == "Dopri5(error_estimate='shampine')"
    # A config names the default "dopri5", the other estimate with its option.
    layer = tfaca.ODELayer(keras.layers.Dense(2), method=tfaca.Dopri5("shampine"))
    config = layer.get_config()
    assert config["method"] == {"name": "dopri5", "error_estimate": "shampine"}
    revived = tfaca.ODELayer.from_config(config)
    solver = revived.solver_options.method
    assert isinstance(solver, tfaca.Dopri5) and solver.error_estimate == "shampine"
    assert solver.tableau.b_error == tfaca.Dopri5("shampine").tableau.b_error
    assert tfaca.ODELayer(keras.layers.Dense(2)).get_config()["method"] == "dopri5"


def test_an_accepted_step_never_shrinks_the_next():
    """After an accepted trial (error ratio <= 1) the next step is at least as long, as
    TorchDiffEqPack, torchdiffeq and diffrax; a rejected one shrinks by the usual factor,
    at most `factor_min`, and a non-finite error by `factor_min`."""
    one = [tf.constant(1e-3, tf.float64)]
    controller = tfaca.StepSizeController(rtol=one, atol=one)
    dt = tf.constant([0.1, -0.1, 0.1, 0.1, 0.1, 0.1, 0.1], tf.float64)
    err = tf.constant([1.0, 0.99, 0.5, 1e-9, 0.0, 2.0, np.nan], tf.float64)
    got = controller.next_step(dt, err, error_order=4).numpy()
    safety = 0.9
    want = [0.1, -0.1, 0.1 * safety * 0.5**-0.2, 0.1 * 10.0, 1.0, 0.1 * safety * 2.0**-0.2,
            0.1 * 0.2]
    np.testing.assert_allclose(got, want, rtol=1e-14)


def _van_der_pol_np(t, y, mu=1.0):
    return [y[1], mu * (1.0 - y[0] ** 2) * y[1] - y[0]]


# Asymptotic regime of one step of each order on the problem below (the 5th-order
# pairs reach it late: Tsit5's ratio settles to 2^6 only below dt ~ 0.1).
_LOCAL_STEP_EXPONENTS = {1: range(3, 7), 2: range(3, 7), 3: range(3, 7), 4: range(3, 7), 5: range(3, 6)}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_single_step_local_error_order(method):
    """One step's error against a reference is O(dt^(order+1)) (a nonlinear problem,
    so a wrong coefficient cannot hide behind the linear stability polynomial)."""
    solver = tfaca.get_solver(method)
    func = lambda t, y: [van_der_pol(t, y[0])]  # noqa: E731
    t0, y0 = f64(0.3), np.array([1.5, -0.7])
    f0 = func(t0, [f64(y0)])
    hs = [0.8 * 2.0**-k for k in _LOCAL_STEP_EXPONENTS[solver.order]]
    errors = []
    for h in hs:
        y1, _, _ = solver.step(func, t0, [f64(y0)], f0, f64(h))
        ref = scipy.integrate.solve_ivp(
            _van_der_pol_np, (0.3, 0.3 + h), y0, method="DOP853", rtol=2.3e-14, atol=1e-15
        ).y[:, -1]
        errors.append(np.linalg.norm(y1[0].numpy() - ref))
    assert min(errors) > 1e-14, errors
    slope = _slope(hs, errors)
    assert abs(slope - (solver.order + 1)) < 0.5, (slope, errors)


# --------------------------------------------------------------------------------------
# Accuracy of adaptive solves
# --------------------------------------------------------------------------------------


_VDP_TS = np.array([0.0, 0.5, 1.5, 3.0, 5.0])


@pytest.fixture(scope="module")
def vdp_reference():
    return scipy.integrate.solve_ivp(
        _van_der_pol_np,
        (_VDP_TS[0], _VDP_TS[-1]),
        np.array([2.0, 0.0]),
        method="DOP853",
        rtol=1e-12,
        atol=1e-12,
        t_eval=_VDP_TS,
    ).y.T


@pytest.mark.parametrize(
    "method, tol", [("dopri5", 1e-8), ("tsit5", 1e-8), ("bosh3", 1e-8), ("heun_euler", 1e-5)]
)
@pytest.mark.slow_variants
def test_adaptive_matches_scipy_dop853(method, tol, vdp_reference):
    @tf.function
    def run():
        return tfaca.solve(
            van_der_pol,
            f64([2.0, 0.0]),
            f64(_VDP_TS),
            method=method,
            rtol=tol,
            atol=tol,
            max_steps=20000,
        )

    sol = run()
    assert int(sol.status) == 0
    assert float(sol.t_final) == _VDP_TS[-1]
    np.testing.assert_array_equal(sol.ts.numpy(), _VDP_TS)
    ys = sol.ys.numpy()
    assert ys.shape == (len(_VDP_TS), 2)
    np.testing.assert_array_equal(ys[0], [2.0, 0.0])
    err = np.abs(ys - vdp_reference).max()
    assert err < 100 * tol, err
    # Tighter tolerance means a more accurate answer, not a coincidence.
    assert int(sol.stats.num_steps) > 20


def test_tighter_tolerance_is_more_accurate(vdp_reference):
    @tf.function
    def run(tol):
        return tfaca.solve(
            van_der_pol, f64([2.0, 0.0]), f64(_VDP_TS), rtol=tol, atol=tol, max_steps=5000
        )

    errors, steps = [], []
    for tol in [1e-4, 1e-6, 1e-8, 1e-10]:
        sol = run(f64(tol))
        errors.append(np.abs(sol.ys.numpy() - vdp_reference).max())
        steps.append(int(sol.stats.num_steps))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert all(a < b for a, b in zip(steps, steps[1:])), steps
    for e, tol in zip(errors, [1e-4, 1e-6, 1e-8, 1e-10]):
        assert e < 100 * tol


# --------------------------------------------------------------------------------------
# Fixed steps land on every output
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
@pytest.mark.parametrize(
    "ts, h",
    [
        ([0.0, 2.0], 0.25),
        ([0.0, 1.0], 0.3),
        ([0.0, 0.25, 0.6, 0.7], 0.1),
        ([0.0, 1.0], 0.1),  # 0.1 accumulated nine times is 1 ulp short of 0.9
        ([0.0, 3.0], 0.01),
        ([0.0, -1.0], 0.3),
    ],
    ids=["2/0.25", "1/0.3", "multi/0.1", "1/0.1", "3/0.01", "reverse/0.3"],
)
def test_fixed_step_count_and_landing(method, ts, h):
    """ceil(interval / h) steps per output interval, landing exactly on each output."""
    times = []

    def func(t, y):
        tf.py_function(lambda t: times.append(float(t)), [t], [])
        return tf.linalg.matvec(tf.constant(A_NP), y)

    @tf.function
    def run():
        return tfaca.solve(func, f64(Y0_NP), f64(ts), method=method, step_size=f64(h),
                           interpolate=False)

    sol = run()
    expected_steps = sum(math.ceil(round(abs(b - a) / h, 9)) for a, b in zip(ts, ts[1:]))
    assert int(sol.stats.num_steps) == expected_steps
    assert int(sol.stats.num_rejected) == 0
    assert float(sol.t_final) == ts[-1]
    if not tfaca.get_solver(method).tableau.fsal:
        # Non-FSAL methods evaluate f at the end of each accepted step: at each output.
        for t_out in ts:
            assert t_out in times, f"no evaluation at output time {t_out}"
    for i, t_out in enumerate(ts):
        np.testing.assert_allclose(
            sol.ys[i].numpy(), expm_solution(A_NP, Y0_NP, t_out), rtol=0, atol=1.5 * h
        )


@pytest.mark.parametrize("method", ["euler", "rk4", "heun_euler", "dopri5"])
def test_fixed_step_fevals(method):
    """Without error control nothing is rejected; evaluations follow the tableau."""
    solver = tfaca.get_solver(method)
    sol = tfaca.solve(
        linear_func(A_NP), f64(Y0_NP), f64([0.0, 1.0]), method=method, step_size=0.125
    )
    n = int(sol.stats.num_steps)
    assert n == 8 and int(sol.stats.num_rejected) == 0
    per_step = solver.tableau.stages - 1 + (0 if solver.tableau.fsal else 1)
    assert int(sol.stats.num_fevals) == 1 + per_step * n


def test_python_float_ts_keep_float64_precision():
    ts = [0.0, 0.1, 0.7]
    sol = tfaca.solve(linear_func(A_NP), f64(Y0_NP), ts, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(sol.ts.numpy(), np.array(ts))
    np.testing.assert_allclose(
        sol.ys[1].numpy(), expm_solution(A_NP, Y0_NP, 0.1), rtol=0, atol=1e-10
    )


def test_python_float_step_size_keeps_float64_precision():
    func = linear_func(A_NP)
    ts = f64([0.0, 1.0])
    a = tfaca.odeint(func, f64(Y0_NP), ts, method="rk4", step_size=0.3)
    b = tfaca.odeint(func, f64(Y0_NP), ts, method="rk4", step_size=f64(0.3))
    np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("arg", ["first_step", "max_step"])
def test_python_float_first_and_max_step_keep_float64_precision(arg):
    times = []

    def func(t, y):
        times.append(float(t))
        return tf.linalg.matvec(tf.constant(A_NP), y)

    # Either the first step is 0.1, or a larger first step is capped to 0.1.
    kwargs = {"first_step": 0.1} if arg == "first_step" else {"first_step": f64(1.0), "max_step": 0.1}
    tfaca.solve(func, f64(Y0_NP), f64([0.0, 1.0]), **kwargs)
    # The first stage of the first trial is at t0 + c[1] * 0.1.
    assert times[1] == 0.2 * 0.1


def _capped_solve(factor_max):
    """Steps capped at 0.1 (float64) reach 0.9999999999999999, 1 ulp short of the output
    1.0, and land on it with a remainder step of ~1e-16."""
    h = f64(0.1)
    ts = f64([0.0, 1.0, 2.0])
    sol = tfaca.solve(
        lambda t, y: -y, f64([1.0]), ts, max_step=h, first_step=h, factor_max=factor_max,
        throw=False,
    )
    return sol, ts.numpy()


@pytest.mark.parametrize("factor_max", [10.0, 5.0, 2.0])
def test_adaptive_landing_one_ulp_short_of_an_output_succeeds(factor_max):
    """Landing on an interior output time with a tiny remainder step must not end the
    solve with a spurious DT_UNDERFLOW."""
    sol, ts = _capped_solve(factor_max)
    assert int(sol.status) == int(tfaca.Status.SUCCESS), int(sol.status)
    np.testing.assert_allclose(sol.ys.numpy()[:, 0], np.exp(-ts), rtol=1e-5)


def test_adaptive_landing_one_ulp_short_does_not_waste_steps():
    """...nor restart from the ~1e-16 remainder step and take ~15 extra steps to grow
    back: 0.1-capped steps over [0, 2] need about 20."""
    sol, _ = _capped_solve(10.0)
    assert int(sol.status) == 0
    assert int(sol.stats.num_steps) <= 22, int(sol.stats.num_steps)


# --------------------------------------------------------------------------------------
# Structures, time direction, output times, dtypes
# --------------------------------------------------------------------------------------


_TS = np.array([0.0, 0.3, 1.0, 2.5])
_Q0 = np.array([[1.0, -2.0], [0.5, 3.0]])


def _check_linear(ys_p, ys_q, ts, atol):
    for i, t in enumerate(ts):
        np.testing.assert_allclose(
            ys_p[i], expm_solution(A_NP, Y0_NP, t - ts[0]), rtol=0, atol=atol
        )
        np.testing.assert_allclose(ys_q[i], np.exp(-0.5 * (t - ts[0])) * _Q0, rtol=0, atol=atol)


def test_nested_tuple_state():
    A = tf.constant(A_NP)

    def func(t, y):
        p, q = y
        assert isinstance(y, tuple)
        return tf.linalg.matvec(A, p), -0.5 * q

    y0 = (f64(Y0_NP), f64(_Q0))
    ys = tfaca.odeint(func, y0, f64(_TS), rtol=1e-10, atol=1e-10)
    assert isinstance(ys, tuple) and len(ys) == 2
    assert ys[0].shape == (len(_TS), 3) and ys[1].shape == (len(_TS), 2, 2)
    assert ys[0].dtype == tf.float64
    np.testing.assert_array_equal(ys[0][0].numpy(), Y0_NP)
    np.testing.assert_array_equal(ys[1][0].numpy(), _Q0)
    _check_linear(ys[0].numpy(), ys[1].numpy(), _TS, 1e-8)


def test_nested_dict_state():
    A = tf.constant(A_NP)

    def func(t, y):
        assert set(y) == {"p", "q"}
        return {"q": -0.5 * y["q"], "p": tf.linalg.matvec(A, y["p"])}

    y0 = {"p": f64(Y0_NP), "q": f64(_Q0)}
    ys = tfaca.odeint(func, y0, f64(_TS), rtol=1e-10, atol=1e-10)
    assert isinstance(ys, dict) and set(ys) == {"p", "q"}
    assert ys["p"].shape == (len(_TS), 3) and ys["q"].shape == (len(_TS), 2, 2)
    np.testing.assert_array_equal(ys["p"][0].numpy(), Y0_NP)
    np.testing.assert_array_equal(ys["q"][0].numpy(), _Q0)
    _check_linear(ys["p"].numpy(), ys["q"].numpy(), _TS, 1e-8)


def test_nested_list_state_with_nesting():
    A = tf.constant(A_NP)

    def func(t, y):
        p, (q,) = y
        return [tf.linalg.matvec(A, p), (-0.5 * q,)]

    y0 = [f64(Y0_NP), (f64(_Q0),)]
    ys = tfaca.odeint(func, y0, f64(_TS), rtol=1e-10, atol=1e-10)
    assert isinstance(ys, list) and isinstance(ys[1], tuple)
    assert ys[0].shape == (len(_TS), 3) and ys[1][0].shape == (len(_TS), 2, 2)
    np.testing.assert_array_equal(ys[0][0].numpy(), Y0_NP)
    np.testing.assert_array_equal(ys[1][0][0].numpy(), _Q0)
    _check_linear(ys[0].numpy(), ys[1][0].numpy(), _TS, 1e-8)


@pytest.mark.parametrize("method, step_size", [("dopri5", None), ("tsit5", None), ("rk4", 0.01)])
@pytest.mark.slow_variants
def test_reverse_time(method, step_size):
    ts = np.array([2.0, 1.5, 0.2, -0.5])
    sol = tfaca.solve(
        linear_func(A_NP),
        f64(Y0_NP),
        f64(ts),
        method=method,
        step_size=step_size,
        rtol=1e-10,
        atol=1e-10,
    )
    assert float(sol.t_final) == ts[-1]
    ys = sol.ys.numpy()
    np.testing.assert_array_equal(ys[0], Y0_NP)
    for i, t in enumerate(ts):
        np.testing.assert_allclose(
            ys[i], expm_solution(A_NP, Y0_NP, t - ts[0]), rtol=0, atol=1e-8
        )


def test_many_output_times_match_expm():
    ts = np.linspace(0.0, 4.0, 17)

    @tf.function
    def run():
        return tfaca.solve(linear_func(A_NP), f64(Y0_NP), f64(ts), rtol=1e-9, atol=1e-9)

    sol = run()
    ys = sol.ys.numpy()
    assert ys.shape == (17, 3)
    for i, t in enumerate(ts):
        np.testing.assert_allclose(ys[i], expm_solution(A_NP, Y0_NP, t), rtol=0, atol=1e-7)
    # Landing on every output costs at least one step per interval.
    assert int(sol.stats.num_steps) >= 16


def test_float32():
    seen = []

    def func(t, y):
        seen.append((t.dtype, y.dtype))
        return tf.linalg.matvec(tf.constant(A_NP, tf.float32), y)

    sol = tfaca.solve(
        func, tf.constant(Y0_NP, tf.float32), [0.0, 1.0, 2.0], rtol=1e-5, atol=1e-6
    )
    assert sol.ys.dtype == tf.float32 and sol.ts.dtype == tf.float32
    assert all(d == (tf.float32, tf.float32) for d in seen)
    for i, t in enumerate([0.0, 1.0, 2.0]):
        np.testing.assert_allclose(
            sol.ys[i].numpy(), expm_solution(A_NP, Y0_NP, t), rtol=0, atol=1e-4
        )


@pytest.mark.parametrize("low", [tf.float16, tf.bfloat16])
def test_low_precision_state_is_solved_in_float32(low):
    seen = []

    def func(t, y):
        seen.append(y.dtype)
        return tf.linalg.matvec(tf.constant(A_NP, tf.float32), y)

    y0 = tf.constant(Y0_NP, low)
    sol = tfaca.solve(func, y0, [0.0, 1.0, 2.0], rtol=1e-5, atol=1e-6)
    assert sol.ys.dtype == low
    assert seen and all(d == tf.float32 for d in seen)
    np.testing.assert_array_equal(sol.ys[0].numpy(), y0.numpy())
    tol = 2e-3 if low == tf.float16 else 2e-2
    for i, t in enumerate([1.0, 2.0], start=1):
        np.testing.assert_allclose(
            sol.ys[i].numpy().astype(np.float64),
            expm_solution(A_NP, y0.numpy().astype(np.float64), t),
            rtol=0,
            atol=tol,
        )


# --------------------------------------------------------------------------------------
# Execution modes and tracing
# --------------------------------------------------------------------------------------


def test_eager_function_and_xla_agree():
    func = linear_func(A_NP)
    ts = f64([0.0, 0.5, 1.7, 3.0])
    y0 = f64(Y0_NP)

    def run(y0, ts):
        sol = tfaca.solve(func, y0, ts, rtol=1e-7, atol=1e-9)
        return sol.ys, sol.stats.num_steps, sol.stats.num_rejected, sol.stats.num_fevals

    eager = run(y0, ts)
    graph = tf.function(run)(y0, ts)
    xla = tf.function(run, jit_compile=True)(y0, ts)
    for other in (graph, xla):
        np.testing.assert_allclose(other[0].numpy(), eager[0].numpy(), rtol=1e-12, atol=1e-12)
        for a, b in zip(eager[1:], other[1:]):
            assert int(a) == int(b)
    for i, t in enumerate(ts.numpy()):
        np.testing.assert_allclose(
            eager[0][i].numpy(), expm_solution(A_NP, Y0_NP, t), rtol=0, atol=1e-6
        )


def test_traces_once_for_new_values():
    traces = []
    func = linear_func(A_NP)

    @tf.function
    def run(y0, ts):
        traces.append(1)
        return tfaca.odeint(func, y0, ts, rtol=1e-8, atol=1e-8)

    rng = np.random.default_rng(0)
    for k in range(3):
        y0 = rng.normal(size=3)
        ts = np.array([0.0, 0.5 + k, 1.0 + 2 * k])
        ys = run(f64(y0), f64(ts)).numpy()
        for i, t in enumerate(ts):
            np.testing.assert_allclose(ys[i], expm_solution(A_NP, y0, t), rtol=0, atol=1e-6)
    assert len(traces) == 1


# --------------------------------------------------------------------------------------
# Tolerances and statistics
# --------------------------------------------------------------------------------------


def _decoupled(t, y):
    """Two identical, independent oscillators in one state of 4 elements."""
    x = tf.reshape(y, [2, 2])
    dx = tf.stack([x[:, 1], -x[:, 0] + 0.3 * tf.sin(t)], axis=1)
    return tf.reshape(dx, [4])


def _decoupled_reference(ts):
    y0 = np.array([1.0, 0.0, 1.0, 0.0])

    def f(t, y):
        x = y.reshape(2, 2)
        return np.stack([x[:, 1], -x[:, 0] + 0.3 * np.sin(t)], axis=1).reshape(4)

    return scipy.integrate.solve_ivp(
        f, (ts[0], ts[-1]), y0, method="DOP853", rtol=1e-12, atol=1e-12, t_eval=ts
    ).y.T


def test_per_element_tolerances():
    ts = np.array([0.0, 2.0, 5.0])
    ref = _decoupled_reference(ts)
    y0 = f64([1.0, 0.0, 1.0, 0.0])

    @tf.function
    def run(rtol, atol):
        return tfaca.solve(_decoupled, y0, f64(ts), rtol=rtol, atol=atol)

    loose = run(f64(1e-3), f64(1e-3))
    tight = run(f64(1e-10), f64(1e-10))
    mixed = run(f64([1e-3, 1e-3, 1e-10, 1e-10]), f64([1e-3, 1e-3, 1e-10, 1e-10]))
    err = lambda s: np.abs(s.ys.numpy() - ref)  # noqa: E731
    # The tight elements are solved as accurately as with a tight scalar tolerance...
    assert err(mixed)[:, 2:].max() < 1e-7
    assert err(loose)[:, 2:].max() > 1e-5
    # ...and the loose elements cost nothing extra, but do not make it cheaper either.
    n = lambda s: int(s.stats.num_steps)  # noqa: E731
    assert n(loose) < n(mixed) <= n(tight)
    # The two oscillators are identical: the mixed solve is one solve of both.
    np.testing.assert_array_equal(mixed.ys.numpy()[:, :2], mixed.ys.numpy()[:, 2:])


@pytest.mark.slow
def test_nested_tolerances_match_flat_per_element_tolerances():
    ts = f64([0.0, 2.0, 5.0])

    def nested_func(t, y):
        return {"a": _decoupled(t, tf.concat([y["a"], y["b"]], 0))[:2],
                "b": _decoupled(t, tf.concat([y["a"], y["b"]], 0))[2:]}

    nested = tfaca.solve(
        nested_func,
        {"a": f64([1.0, 0.0]), "b": f64([1.0, 0.0])},
        ts,
        rtol={"a": 1e-3, "b": 1e-9},
        atol={"a": f64([1e-3, 1e-3]), "b": 1e-9},
    )
    flat = tfaca.solve(
        _decoupled,
        f64([1.0, 0.0, 1.0, 0.0]),
        ts,
        rtol=f64([1e-3, 1e-3, 1e-9, 1e-9]),
        atol=f64([1e-3, 1e-3, 1e-9, 1e-9]),
    )
    assert int(nested.stats.num_steps) == int(flat.stats.num_steps)
    assert int(nested.stats.num_rejected) == int(flat.stats.num_rejected)
    np.testing.assert_allclose(nested.ys["a"].numpy(), flat.ys.numpy()[:, :2], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(nested.ys["b"].numpy(), flat.ys.numpy()[:, 2:], rtol=1e-10, atol=1e-12)
    ref = _decoupled_reference(ts.numpy())
    assert np.abs(nested.ys["b"].numpy() - ref[:, 2:]).max() < 1e-6


@pytest.mark.parametrize(
    "method, per_trial, per_accept",
    [("dopri5", 6, 0), ("tsit5", 6, 0), ("bosh3", 3, 0), ("heun_euler", 1, 1)],
)
@pytest.mark.slow_variants
def test_num_fevals_formula(method, per_trial, per_accept):
    """f0, one for the first-step selection, stages - 1 per trial (FSAL), plus one per
    accepted step for non-FSAL pairs (f at the new point)."""

    @tf.function
    def run(first_step):
        return tfaca.solve(
            lambda t, y: van_der_pol(t, y, 5.0),
            f64([2.0, 0.0]),
            f64([0.0, 3.0, 6.0]),
            method=method,
            rtol=1e-5,
            atol=1e-5,
            first_step=first_step,
            max_steps=5000,
        )

    sol = run(None)
    steps, rejected = int(sol.stats.num_steps), int(sol.stats.num_rejected)
    assert steps > 10
    if method == "dopri5":
        assert rejected > 0  # the formula is checked with rejections present
    assert int(sol.stats.num_fevals) == 2 + per_trial * (steps + rejected) + per_accept * steps

    sol = run(f64(1e-3))
    steps, rejected = int(sol.stats.num_steps), int(sol.stats.num_rejected)
    assert int(sol.stats.num_fevals) == 1 + per_trial * (steps + rejected) + per_accept * steps


def test_first_step_is_used_and_skips_selection():
    times = []

    def func(t, y):
        times.append(float(t))
        return tf.linalg.matvec(tf.constant(A_NP), y)

    h = 2.0**-6
    sol = tfaca.solve(func, f64(Y0_NP), f64([0.0, 1.0]), first_step=h)
    # f0 at t0, then the first trial's stages at c[i] * h: no selection evaluation.
    assert times[:7] == [0.0] + [c * h for c in tfaca.Dopri5.tableau.c[1:]]
    assert int(sol.stats.num_fevals) == 1 + 6 * (
        int(sol.stats.num_steps) + int(sol.stats.num_rejected)
    )

    times.clear()
    sol = tfaca.solve(func, f64(Y0_NP), f64([0.0, 1.0]))
    assert times[0] == 0.0 and times[1] > 0.0  # selection probe at t0 + h0
    assert int(sol.stats.num_fevals) == 2 + 6 * (
        int(sol.stats.num_steps) + int(sol.stats.num_rejected)
    )


@pytest.mark.parametrize("max_step", [0.25, 0.1])
def test_max_step_bounds_the_step(max_step):
    func = linear_func(A_NP)
    T = 4.0
    free = tfaca.solve(func, f64(Y0_NP), f64([0.0, T]))
    bounded = tfaca.solve(func, f64(Y0_NP), f64([0.0, T]), max_step=f64(max_step))
    assert int(free.stats.num_steps) < T / max_step
    assert int(bounded.stats.num_steps) >= math.ceil(T / max_step - 1e-9)
    np.testing.assert_allclose(
        bounded.ys[-1].numpy(), expm_solution(A_NP, Y0_NP, T), rtol=0, atol=1e-4
    )


def test_solution_fields():
    sol = tfaca.solve(linear_func(A_NP), f64(Y0_NP), [0.0, 1.0])
    assert isinstance(sol, tfaca.Solution) and isinstance(sol.stats, tfaca.Stats)
    assert int(sol.status) == int(tfaca.Status.SUCCESS) == 0
    assert sol.status.dtype == tf.int32
    assert float(sol.t_final) == 1.0
    assert sol.ts.dtype == tf.float64
    ys = tfaca.odeint(linear_func(A_NP), f64(Y0_NP), [0.0, 1.0])
    np.testing.assert_array_equal(ys.numpy(), sol.ys.numpy())


# --------------------------------------------------------------------------------------
# User-defined solvers
# --------------------------------------------------------------------------------------


class Ralston(tfaca.AbstractSolver):
    tableau = tfaca.ButcherTableau(c=(0.0, 2 / 3), a_lower=((2 / 3,),), b_sol=(0.25, 0.75))
    order = 2
    error_order = None


class RalstonEuler(tfaca.AbstractSolver):
    """Ralston's 2nd-order method with an embedded Euler step."""

    tableau = tfaca.ButcherTableau(
        c=(0.0, 2 / 3), a_lower=((2 / 3,),), b_sol=(0.25, 0.75), b_error=(-0.75, 0.75)
    )
    order = 2
    error_order = 1


class Kutta3(tfaca.AbstractSolver):
    """Kutta's third-order method (fixed step)."""

    tableau = tfaca.ButcherTableau(
        c=(0.0, 0.5, 1.0), a_lower=((0.5,), (-1.0, 2.0)), b_sol=(1 / 6, 2 / 3, 1 / 6)
    )
    order = 3
    error_order = None


@pytest.mark.parametrize("solver", [Ralston, Ralston(), RalstonEuler, Kutta3()])
def test_user_defined_solver_order(solver):
    instance = tfaca.get_solver(solver)
    assert isinstance(instance, tfaca.AbstractSolver)
    order = instance.order
    T = 2.0
    exact = expm_solution(A_NP, Y0_NP, T)

    @tf.function
    def run(h):
        return tfaca.odeint(
            linear_func(A_NP), f64(Y0_NP), f64([0.0, T]), method=solver, step_size=h
        )[-1]

    hs = [2.0**-k for k in _STEP_EXPONENTS[order]]
    errors = [np.linalg.norm(run(f64(h)).numpy() - exact) for h in hs]
    slope = _slope(hs, errors)
    assert abs(slope - order) < 0.3, (slope, errors)


def test_user_defined_adaptive_pair():
    solver = RalstonEuler()
    assert solver.adaptive and not solver.tableau.fsal
    ts = np.array([0.0, 1.0, 3.0])

    @tf.function
    def run(tol):
        return tfaca.solve(
            linear_func(A_NP), f64(Y0_NP), f64(ts), method=solver, rtol=tol, atol=tol,
            max_steps=5000,
        )

    errors = []
    for tol in [1e-4, 1e-6]:
        sol = run(f64(tol))
        assert int(sol.status) == 0
        steps, rejected = int(sol.stats.num_steps), int(sol.stats.num_rejected)
        assert int(sol.stats.num_fevals) == 2 + (steps + rejected) + steps
        errors.append(
            max(np.abs(sol.ys[i].numpy() - expm_solution(A_NP, Y0_NP, t)).max()
                for i, t in enumerate(ts))
        )
        assert errors[-1] < 100 * tol
    assert errors[1] < errors[0] / 10

    # Its error estimate is O(dt^2).
    func = lambda t, y: [van_der_pol(t, y[0])]  # noqa: E731
    t0, y0 = f64(0.3), f64([1.5, -0.7])
    f0 = func(t0, [y0])
    hs = [0.1 * 2.0**-k for k in range(5)]
    errs = [np.linalg.norm(solver.step(func, t0, [y0], f0, f64(h))[2][0].numpy()) for h in hs]
    assert abs(_slope(hs, errs) - 2) < 0.3


def test_user_defined_solver_validation():
    class NoTableau(tfaca.AbstractSolver):
        order = 1

    class BadOrder(tfaca.AbstractSolver):
        tableau = Ralston.tableau
        order = 0

    class Mismatch(tfaca.AbstractSolver):
        tableau = Ralston.tableau
        order = 2
        error_order = 1

    with pytest.raises(TypeError, match="tableau"):
        NoTableau()
    with pytest.raises(ValueError, match="order"):
        BadOrder()
    with pytest.raises(ValueError, match="error_order"):
        Mismatch()


@pytest.mark.parametrize(
    "method, expected",
    [("euler", 1), ("midpoint", 2), ("rk4", 4), ("heun_euler", 2), ("bosh3", 3),
     ("dopri5", 6), ("tsit5", 6)],
)
def test_solution_only_step_skips_the_stages_y1_does_not_use(method, expected):
    solver = tfaca.get_solver(method)
    assert solver.tableau.solution_stages == expected
    calls = []

    def func(t, y):
        calls.append(float(t))
        return [tf.linalg.matvec(tf.constant(A_NP), y[0]) * tf.cos(t)]

    y0 = [tf.constant(Y0_NP)]
    t0, dt = tf.constant(0.3, tf.float64), tf.constant(0.1, tf.float64)
    full, _, _ = solver.step(func, t0, y0, func(t0, y0), dt)
    calls.clear()
    short, f1, y_error = solver.step(func, t0, y0, func(t0, y0), dt, solution_only=True)
    assert len(calls) == expected  # f0 plus the stages y1 needs
    assert f1 is None and y_error is None
    np.testing.assert_array_equal(short[0].numpy(), full[0].numpy())


# --------------------------------------------------------------------------------------
# ALF: the reversible leapfrog solver
# --------------------------------------------------------------------------------------


A = np.array([[-0.1, 1.0], [-1.0, -0.1]])


def linear(t, y):
    return tf.linalg.matvec(tf.constant(A, y.dtype), y)


def exact_linear(t, y0):
    """exp(t A) y0 for the damped rotation A."""
    c, s = np.cos(t), np.sin(t)
    return np.exp(-0.1 * t) * np.array([[c, s], [-s, c]]) @ y0


@pytest.mark.parametrize("damping, order", [(1.0, 2), (0.8, 1)])
def test_alf_converges_at_its_order(damping, order):
    """Fixed steps halved four times: the error falls by 2**order each time."""
    y0 = np.array([1.0, 0.0])
    errors = []
    for h in (0.1, 0.05, 0.025, 0.0125):
        ys = tfaca.odeint(linear, tf.constant(y0), [0.0, 2.0], method=tfaca.ALF(damping=damping),
                          step_size=h, gradient="naive")
        errors.append(np.max(np.abs(ys[-1].numpy() - exact_linear(2.0, y0))))
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    np.testing.assert_allclose(rates, order, atol=0.1)


def test_alf_adaptive_error_follows_the_tolerance():
    y0 = np.array([1.0, 0.0])
    errors, steps = [], []
    for rtol in (1e-3, 1e-5):
        sol = tfaca.solve(linear, tf.constant(y0), [0.0, 2.0], method="alf", rtol=rtol,
                          atol=rtol * 1e-2, gradient="naive", max_steps=5000)
        errors.append(np.max(np.abs(sol.ys[-1].numpy() - exact_linear(2.0, y0))))
        steps.append(int(sol.stats.num_steps))
    assert errors[1] < errors[0] / 10 and errors[0] < 1e-2
    assert steps[1] > steps[0]


@pytest.mark.parametrize("dtype, bound", [(tf.float64, 1e-12), (tf.float32, 1e-4)])
def test_alf_inverse_rebuilds_the_start_from_the_end(dtype, bound):
    """The accepted steps inverted from the end give back y0 (and v0 = f(t0, y0)) to
    rounding: the drift MALI's gradient lives with (benchmarks/mali_memory.md)."""
    field = NestedField(dtype)
    y0 = nested_y0(dtype)
    solver = tfaca.ALF()
    trajectory = recorded_trajectory(solver, field, [0.0, 5.0], y0, 1e-4)
    cp = trajectory.checkpoints
    assert cp.y == () and int(cp.num_steps) > 100
    y, v = cp.y_end, cp.f_end
    for i in reversed(range(int(cp.num_steps))):
        y, v = solver.inverse(field, cp.t[i, 0], y, v, cp.dt[i, 0])
    for rebuilt, start in zip(y, y0):
        drift = np.max(np.abs(rebuilt.numpy() - start.numpy())) / np.max(np.abs(start.numpy()))
        assert drift < bound
    for rebuilt, start in zip(v, field(tf.constant(0.0, dtype), y0)):
        assert np.max(np.abs(rebuilt.numpy() - start.numpy())) < 100 * bound

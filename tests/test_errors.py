"""Failures of a solve and bad arguments: each gives its error, and the message names
the argument (or the cause) and the value received."""

import re

import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import A_NP, f64, linear_func

Y0_NP = np.array([1.0, 0.5, -0.3])


def _decay(t, y):
    return -y


def _square(t, y):
    """y' = y^2, y(0) = 1: y = 1 / (1 - t) blows up at t = 1."""
    return y * y


def _nan_after_half(t, y):
    return tf.where(t > 0.5, tf.constant(np.nan, y.dtype) * y, -y)


# --------------------------------------------------------------------------------------
# Failed solves
# --------------------------------------------------------------------------------------


def test_max_steps_reached_eager():
    with pytest.raises(tfaca.SolveError, match="max_steps") as info:
        tfaca.solve(_decay, f64([1.0]), f64([0.0, 10.0]), rtol=1e-10, atol=1e-10, max_steps=5)
    assert "MAX_STEPS_REACHED" in str(info.value)
    assert isinstance(info.value, RuntimeError)
    # It says where the solve stopped: t is a number strictly inside (0, 10).
    t = float(re.search(r"t=([-0-9.e+]+)", str(info.value)).group(1))
    assert 0.0 < t < 10.0


def test_max_steps_reached_in_function():
    @tf.function
    def run(y0, ts):
        return tfaca.odeint(_decay, y0, ts, rtol=1e-10, atol=1e-10, max_steps=5)

    with pytest.raises(tf.errors.InvalidArgumentError, match="max_steps"):
        run(f64([1.0]), f64([0.0, 10.0]))
    # The same graph succeeds when the values allow it: the check is at run time.
    ys = run(f64([1.0]), f64([0.0, 1e-3]))
    np.testing.assert_allclose(ys.numpy()[-1], np.exp(-1e-3), rtol=1e-9)


def test_max_steps_reached_status_without_throw():
    ts = f64([0.0, 0.01, 5.0, 10.0])
    sol = tfaca.solve(_decay, f64([1.0]), ts, rtol=1e-10, atol=1e-10, max_steps=8, throw=False)
    assert int(sol.status) == int(tfaca.Status.MAX_STEPS_REACHED)
    assert int(sol.stats.num_steps) + int(sol.stats.num_rejected) == 8
    ys = sol.ys.numpy()[:, 0]
    np.testing.assert_allclose(ys[:2], np.exp(-ts.numpy()[:2]), rtol=1e-8)
    assert np.all(np.isnan(ys[2:]))
    assert 0.01 <= float(sol.t_final) < 5.0


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
        (_decay, dict(rtol=1e-10, atol=1e-10, max_steps=6), tfaca.Status.MAX_STEPS_REACHED),
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
    assert tfaca.Status.name_of(_solve().status) == "SUCCESS"
    assert tfaca.Status.name_of(np.array([[3], [1]])) == [["NONFINITE"], ["MAX_STEPS_REACHED"]]
    assert tfaca.Status.name_of(2) == "DT_UNDERFLOW"
    with pytest.raises(TypeError, match="`status` must be a value"):
        tf.function(tfaca.Status.name_of)(tf.constant(0))


# --------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------


def _solve(**overrides):
    kwargs = dict(func=linear_func(A_NP), y0=f64(Y0_NP), ts=f64([0.0, 1.0]))
    kwargs.update(overrides)
    func, y0, ts = kwargs.pop("func"), kwargs.pop("y0"), kwargs.pop("ts")
    return tfaca.solve(func, y0, ts, **kwargs)


def _received(name, value):
    return re.escape(f"{name}={value!r}")


@pytest.mark.parametrize("method", ["dopri8", "", 3, None])
def test_unknown_method(method):
    with pytest.raises(ValueError, match="`method` must be one of") as info:
        _solve(method=method)
    assert re.search(_received("method", method), str(info.value))
    assert "dopri5" in str(info.value)  # lists the valid choices


def test_method_name_is_case_insensitive():
    a = _solve(method="DoPri5").ys.numpy()
    b = _solve(method="dopri5").ys.numpy()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("gradient", ["backsolve", 1])
def test_unknown_gradient(gradient):
    with pytest.raises(ValueError, match="`gradient` must be one of") as info:
        _solve(gradient=gradient)
    assert re.search(_received("gradient", gradient), str(info.value))


@pytest.mark.parametrize("rtol", [0.0, -1e-3, float("nan"), float("inf")])
def test_bad_rtol(rtol):
    with pytest.raises(ValueError, match=r"`rtol` must be finite and > 0") as info:
        _solve(rtol=rtol)
    assert f"rtol={rtol!r}" in str(info.value)


@pytest.mark.parametrize("atol", [-1e-6, float("nan")])
def test_bad_atol(atol):
    with pytest.raises(ValueError, match=r"`atol` must be finite and >= 0") as info:
        _solve(atol=atol)
    assert f"atol={atol!r}" in str(info.value)


def test_zero_atol_is_allowed():
    sol = _solve(atol=0.0, rtol=1e-8)
    assert int(sol.status) == 0


def test_bad_per_element_tolerances():
    with pytest.raises(ValueError, match="`rtol` must be finite and > 0"):
        _solve(rtol=np.array([1e-3, 0.0, 1e-3]))
    with pytest.raises(ValueError, match="`atol` must broadcast to the state's shape"):
        _solve(atol=np.array([1e-6, 1e-6]))
    with pytest.raises(ValueError, match="`rtol` must be a scalar or have the structure of `y0`"):
        tfaca.solve(
            lambda t, y: (-y[0], -y[1]), (f64([1.0]), f64([2.0])), [0.0, 1.0],
            rtol=(1e-3, 1e-3, 1e-3),
        )
    with pytest.raises(TypeError, match="rtol"):
        _solve(rtol="tight")


@pytest.mark.parametrize("ts", [[[[0.0, 1.0], [2.0, 3.0]]], 1.0])
def test_ts_not_1d(ts):
    with pytest.raises(ValueError, match=r"`ts` must be 1-D, or 2-D") as info:
        _solve(ts=ts)
    shape = np.shape(ts)
    assert f"ts with shape ({', '.join(map(str, shape))})" in str(info.value)


@pytest.mark.parametrize("ts", [[0.0], []])
def test_ts_too_short(ts):
    with pytest.raises(ValueError, match=r"`ts` must hold at least two times") as info:
        _solve(ts=ts)
    assert "Received: ts=" in str(info.value)


@pytest.mark.parametrize("ts", [[0.0, 2.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.5], [0.0, np.nan]])
def test_ts_not_monotone_eager(ts):
    with pytest.raises(ValueError, match=r"`ts` must be strictly increasing or strictly decreasing"
                       ) as info:
        _solve(ts=ts)
    assert "Received: ts=" in str(info.value)


@pytest.mark.slow
def test_ts_not_monotone_in_function():
    @tf.function
    def run(ts):
        return tfaca.odeint(linear_func(A_NP), f64(Y0_NP), ts)

    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"`ts` must be strictly increasing"
    ) as info:
        run(f64([0.0, 2.0, 1.0]))
    assert "0 2 1" in str(info.value)  # the received values
    ys = run(f64([0.0, 1.0, 2.0]))  # the same graph, monotone values
    assert ys.shape == (3, 3)


def test_ts_not_real():
    with pytest.raises(TypeError, match="`ts` must be real numbers"):
        _solve(ts=["a", "b"])


def test_integer_ts_are_accepted():
    a = _solve(ts=[0, 1]).ys.numpy()
    b = _solve(ts=f64([0.0, 1.0])).ys.numpy()
    np.testing.assert_array_equal(a, b)


def test_func_wrong_shape():
    with pytest.raises(ValueError, match="`func` must return dy/dt with the shape") as info:
        _solve(func=lambda t, y: y[:2])
    assert "shape (2,) for a state of shape (3,)" in str(info.value)


def test_func_wrong_shape_in_function():
    @tf.function
    def run(y0):
        return tfaca.odeint(lambda t, y: tf.expand_dims(y, 0), y0, [0.0, 1.0])

    with pytest.raises(ValueError, match=r"shape \(1, 3\) for a state of shape \(3,\)"):
        run(f64(Y0_NP))


@pytest.mark.parametrize(
    "func",
    [
        lambda t, y: -y[0],  # a tensor for a tuple state
        lambda t, y: (-y[0],),  # too short
        lambda t, y: (-y[0], -y[1], -y[1]),  # too long
        lambda t, y: {"a": -y[0], "b": -y[1]},  # a dict for a tuple
    ],
    ids=["tensor_for_tuple", "too_short", "too_long", "dict_for_tuple"],
)
def test_func_wrong_structure(func):
    y0 = (f64([1.0, 2.0]), f64([3.0]))
    with pytest.raises(ValueError, match="`func` must return dy/dt with the structure of `y0`"
                       ) as info:
        tfaca.solve(func, y0, [0.0, 1.0])
    assert "for a state (TensorShape([2]), TensorShape([1]))" in str(info.value)


def test_func_wrong_dict_keys():
    """A dict with other keys than the state's is a wrong structure; accepting it pairs
    derivatives with state entries by sorted key (here x' = -x and v' = v)."""
    y0 = {"x": f64([1.0]), "v": f64([0.0])}
    with pytest.raises(ValueError, match="structure of `y0`"):
        tfaca.solve(lambda t, y: {"x": y["v"], "y": -y["x"]}, y0, [0.0, 1.0])


def test_func_integer_output():
    with pytest.raises(TypeError, match=r"`func` must return floating values. Received dtype int32"):
        _solve(func=lambda t, y: tf.zeros([3], tf.int32))


def test_func_not_callable():
    with pytest.raises(TypeError, match=re.escape("`func` must be callable. Received: func=3")):
        tfaca.solve(3, f64(Y0_NP), [0.0, 1.0])


@pytest.mark.parametrize(
    "y0, names",
    [
        (tf.constant([1, 2], tf.int32), "['int32']"),
        (np.array([1, 2]), "['int64']"),
        (tf.constant([True]), "['bool']"),
        ((tf.constant([1.0], tf.float32), tf.constant([1.0], tf.float64)), "['float32', 'float64']"),
        ({"a": tf.constant([1.0]), "b": tf.constant([1])}, "['float32', 'int32']"),
    ],
)
def test_bad_y0_dtypes(y0, names):
    with pytest.raises(TypeError, match=r"`y0` must be floating tensors of one dtype") as info:
        tfaca.solve(lambda t, y: y, y0, [0.0, 1.0])
    assert f"Received dtypes: {names}" in str(info.value)


def test_empty_y0():
    with pytest.raises(ValueError, match=re.escape("`y0` must hold at least one tensor. Received: y0=()")):
        tfaca.solve(lambda t, y: y, (), [0.0, 1.0])


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_fixed_step_method_needs_step_size(method):
    with pytest.raises(ValueError, match=r"`step_size` is required") as info:
        _solve(method=method)
    assert "Received: step_size=None" in str(info.value)
    assert type(tfaca.get_solver(method)).__name__ in str(info.value)


def test_user_fixed_step_solver_needs_step_size():
    class Ralston(tfaca.AbstractSolver):
        tableau = tfaca.ButcherTableau(c=(0.0, 2 / 3), a_lower=((2 / 3,),), b_sol=(0.25, 0.75))
        order = 2
        error_order = None

    with pytest.raises(ValueError, match=r"`step_size` is required by the fixed-step method Ralston"):
        _solve(method=Ralston)


@pytest.mark.parametrize("name", ["step_size", "first_step", "max_step"])
@pytest.mark.parametrize("value", [0.0, -0.1, float("inf")])
def test_bad_step_arguments(name, value):
    kwargs = {name: value}
    if name != "step_size":
        kwargs["method"] = "dopri5"
    with pytest.raises(ValueError, match=rf"`{name}` must be finite and > 0") as info:
        _solve(**kwargs)
    assert f"{name}={value!r}" in str(info.value)


@pytest.mark.parametrize("max_steps", [0, -5, 2.5, 100.0, True, "100", None])
def test_bad_max_steps(max_steps):
    with pytest.raises(ValueError, match=r"`max_steps` must be a positive Python int") as info:
        _solve(max_steps=max_steps)
    assert f"max_steps={max_steps!r}" in str(info.value)


def test_numpy_int_max_steps_is_accepted():
    assert int(_solve(max_steps=np.int64(50)).status) == 0


@pytest.mark.parametrize("args", [[1.0], 1.0, {"k": 1.0}, tf.constant([1.0])])
def test_args_not_tuple(args):
    with pytest.raises(TypeError, match=r"`args` must be a tuple") as info:
        _solve(func=lambda t, y, k: -k * y, args=args)
    assert "Received: args=" in str(info.value)


def test_args_tuple_is_passed():
    ys = _solve(func=lambda t, y, k: -k * y, args=(f64(2.0),), rtol=1e-9, atol=1e-9).ys
    np.testing.assert_allclose(ys.numpy()[-1], np.exp(-2.0) * Y0_NP, rtol=1e-7)


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("safety", 0.0, r"`safety` must be in \(0, 1\]"),
        ("safety", 1.5, r"`safety` must be in \(0, 1\]"),
        ("factor_min", 0.0, r"`factor_min` must be in \(0, 1\]"),
        ("factor_min", 2.0, r"`factor_min` must be in \(0, 1\]"),
        ("factor_max", 0.5, r"`factor_max` must be >= 1"),
    ],
)
def test_bad_controller_parameters(name, value, match):
    with pytest.raises(ValueError, match=match) as info:
        _solve(**{name: value})
    assert f"{name}={value!r}" in str(info.value)


def test_bad_solver_class_and_tableau():
    class NotASolver:
        pass

    with pytest.raises(ValueError, match="`method` must be one of"):
        _solve(method=NotASolver)
    with pytest.raises(ValueError, match=r"Row 0 of `a_lower` must sum to c\[1\]"):
        tfaca.ButcherTableau(c=(0.0, 0.5), a_lower=((0.4,),), b_sol=(0.0, 1.0))


def test_tolerance_dict_with_other_keys():
    """Per-component tolerances are matched to the state by key, not by sorted position."""
    y0 = {"x": f64([1.0]), "v": f64([0.0])}
    with pytest.raises(ValueError, match="`rtol` must be a scalar or have the structure of `y0`"):
        tfaca.solve(
            lambda t, y: {"x": y["v"], "v": -y["x"]}, y0, [0.0, 1.0],
            rtol={"x": 1e-3, "w": 1e-9},
        )


@pytest.mark.parametrize("entry", [tfaca.solve, tfaca.odeint], ids=["solve", "odeint"])
def test_torchdiffeq_options_dict_says_to_pass_keywords(entry):
    with pytest.raises(TypeError, match=r"`options`.*keyword argument") as info:
        entry(linear_func(A_NP), f64(Y0_NP), f64([0.0, 1.0]), method="rk4",
              options=dict(step_size=0.1, max_num_steps=50))
    message = str(info.value)
    assert "odeint(func, y0, ts, step_size=0.1, max_steps=50)" in message
    assert "Received: options={'step_size': 0.1, 'max_num_steps': 50}" in message

"""`tfaca.solve` and `odeint`, the functional API: bad arguments are refused with a
message that names the argument and the value received, arguments are converted as
documented, batches that are empty are solved, and float32 solves keep float32's
precision on GPUs (`precision=`)."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import A_NP, F64, MODES, Y0_NP, f64, linear_func, relative_error, strategy


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


def test_times_rule_error_names_the_row_and_the_fix():
    """Times per sample that break the rule: the error names the first row that breaks
    it, with its times, and says how to fix it; in a graph too."""
    ts = f64([[0.0, 1.0, 2.0], [0.0, 0.5, 1.0], [0.1, 0.5, 1.0]])
    y0 = f64([[1.0], [1.0], [1.0]])
    with pytest.raises(ValueError, match=r"Row 2 breaks it: ts\[2\]=\[0\.1 0\.5 1\. *\].*"
                                         r"start every row at the same time"):
        tfaca.odeint(lambda t, y: -y, y0, ts)
    with pytest.raises(ValueError, match=r"Row 1 breaks it.*pad a shorter row"):
        tfaca.odeint(lambda t, y: -y, y0, f64([[0.0, 1.0, 2.0], [0.0, 1.0, 0.5], [0, 1, 2]]))

    @tf.function(input_signature=[tf.TensorSpec([None, 3], F64)])
    def run(ts):
        return tfaca.odeint(lambda t, y: -y, tf.ones([tf.shape(ts)[0], 1], F64), ts)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"Row.*\b2\b.*breaks it.*0\.1"):
        run(ts)


def test_batch_mismatch_of_times_and_state_in_a_graph_is_named():
    """Times per sample whose batch differs from the state's, in a graph where neither
    batch is known while tracing: tfaca's message, not a TensorFlow shape error."""

    @tf.function(input_signature=[tf.TensorSpec([None, 2], F64), tf.TensorSpec([None, 3], F64)])
    def run(y0, ts):
        return tfaca.odeint(lambda t, y: -y, y0, ts)

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"needs every component of `y0` to have the same batch.*\[8 3\]"):
        run(tf.ones([4, 2], F64), tf.zeros([8, 3], F64) + f64([0.0, 1.0, 2.0]))


# --------------------------------------------------------------------------------------
# Argument conversions
# --------------------------------------------------------------------------------------


def test_python_float_args_follow_a_float64_state():
    ys = tfaca.odeint(lambda t, y, k: -k * y, f64([1.0]), f64([0.0, 1.0]), args=(0.5,),
                      rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ys.numpy()[-1], np.exp(-0.5), rtol=1e-9)


def test_numpy_args_follow_a_float64_state():
    ys = tfaca.odeint(lambda t, y, k: -k * y, f64([1.0, 2.0]), f64([0.0, 1.0]),
                      args=(np.array([0.5, 1.0], np.float32),), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ys.numpy()[-1], np.array([1.0, 2.0]) * np.exp([-0.5, -1.0]),
                               rtol=1e-9)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_args_are_solved_in_float32(dtype):
    y0 = tf.constant([1.0, 2.0], dtype)
    k = tf.constant([0.5, 1.0], dtype)
    with tf.GradientTape() as tape:
        tape.watch(k)
        ys = tfaca.odeint(lambda t, y, k: -k * y, y0, [0.0, 1.0], args=(k,))
        loss = tf.reduce_sum(tf.cast(ys[-1], tf.float32))
    assert ys.dtype == dtype
    np.testing.assert_allclose(tf.cast(ys[-1], tf.float32).numpy(), [np.exp(-0.5), 2 * np.exp(-1.0)],
                               rtol=1e-2)
    g = tape.gradient(loss, k)
    assert g.dtype == dtype
    np.testing.assert_allclose(tf.cast(g, tf.float32).numpy(), [-np.exp(-0.5), -2 * np.exp(-1.0)],
                               rtol=2e-2)


# --------------------------------------------------------------------------------------
# Empty batches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
# Shared steps cannot step onto every sample's times: interpolate=False is refused there.
@pytest.mark.parametrize("per_sample,interpolate", [(False, True), (True, True), (True, False)])
@pytest.mark.slow_variants
def test_empty_batch_returns_empty_outputs_and_gradients(per_sample, mode, interpolate):
    """A batch of 0 samples (a replica's share of a short last batch) with per-sample
    steps or times per sample returns empty outputs and zero gradients, eagerly and in
    a graph of unknown batch (it crashed in 9 of 12 combinations)."""
    W = tf.Variable(A_NP * 0.3)

    def func(t, y):
        return tf.tanh(tf.linalg.matvec(W, y))

    def run(y0):
        times = tf.zeros([tf.shape(y0)[0], 3], F64) + f64([0.0, 0.5, 1.0])
        with tf.GradientTape() as tape:
            tape.watch(y0)
            ys = tfaca.odeint(func, y0, times, per_sample=per_sample, interpolate=interpolate,
                              gradient=strategy(mode))
            loss = tf.reduce_sum(ys)
        g_y0, g_w = tape.gradient(loss, [y0, W])
        return ys, g_y0, tf.zeros_like(W) if g_w is None else g_w

    empty = tf.zeros([0, 3], F64)
    graph = tf.function(run, input_signature=[tf.TensorSpec([None, 3], F64)])
    for ys, g_y0, g_w in (run(empty), graph(empty)):
        assert ys.shape == (3, 0, 3) and g_y0.shape == (0, 3)
        np.testing.assert_array_equal(g_w.numpy(), 0.0)


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_with_shared_times_and_steps(mode):
    """Times and steps the batch shares, interpolated, for a batch of 0 samples: the
    compiled loop's output buffer then has one row of entries of 0 elements, which XLA
    refuses to scatter into. (Per-sample steps read shared times by rows, one per sample:
    no row at all, as with times per sample above.)"""
    W = tf.Variable(A_NP * 0.3)

    @tf.function(input_signature=[tf.TensorSpec([None, 3], F64)], jit_compile=True)
    def run(y0):
        with tf.GradientTape() as tape:
            tape.watch(y0)
            ys = tfaca.odeint(lambda t, y: tf.tanh(tf.linalg.matvec(W, y)), y0,
                              f64([0.0, 0.25, 0.5, 1.0]), gradient=strategy(mode))
            loss = tf.reduce_sum(ys)
        g_y0, g_w = tape.gradient(loss, [y0, W])
        return ys, g_y0, tf.zeros_like(W) if g_w is None else g_w

    ys, g_y0, g_w = run(tf.zeros([0, 3], F64))
    assert ys.shape == (4, 0, 3) and g_y0.shape == (0, 3)
    np.testing.assert_array_equal(g_w.numpy(), 0.0)


def test_empty_batch_with_compiled_adjoint():
    """The adjoint's reverse solve compiled with XLA (the default in a graph) for an
    empty batch of times per sample: it failed to compile (slices of an empty batch)."""
    W = tf.Variable(A_NP * 0.3)

    @tf.function(input_signature=[tf.TensorSpec([None, 3], F64)])
    def run(y0):
        times = tf.zeros([tf.shape(y0)[0], 3], F64) + f64([0.0, 0.5, 1.0])
        with tf.GradientTape() as tape:
            tape.watch(y0)
            ys = tfaca.odeint(lambda t, y: tf.tanh(tf.linalg.matvec(W, y)), y0, times,
                              gradient="adjoint", jit_compile=True)
            loss = tf.reduce_sum(ys)
        return tape.gradient(loss, [y0, W])

    g_y0, g_w = run(tf.zeros([0, 3], F64))
    assert g_y0.shape == (0, 3)
    np.testing.assert_array_equal(g_w.numpy(), 0.0)


# --------------------------------------------------------------------------------------
# Precision: float32 solves keep float32's precision on GPUs (TF32 off)
# --------------------------------------------------------------------------------------


@pytest.fixture
def tf32_on():
    """TensorFlow's TF32 on (its default) for the test, and as it was after."""
    before = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(True)
    yield
    tf.config.experimental.enable_tensor_float_32_execution(before)


def _tf32():
    return tf.config.experimental.tensor_float_32_execution_enabled()


@pytest.mark.parametrize("dtype, precision, tf32_after", [
    ("float32", "float32", False),
    ("float16", "float32", False),  # computes in float32
    ("float64", "float32", True),  # TF32 plays no part
    ("float32", "tf32", True),  # left as it is
])
def test_precision_turns_tf32_off_for_float32_solves(tf32_on, dtype, precision, tf32_after):
    assert _tf32()
    tfaca.solve(lambda t, y: -y, tf.ones([2], dtype), [0.0, 1.0], precision=precision)
    assert _tf32() is tf32_after


def test_precision_is_applied_when_a_graph_is_traced_and_by_a_layer(tf32_on):
    """In a graph TensorFlow reads the setting when the kernels run (and XLA when it
    compiles): turned off while tracing, it holds for every later run."""
    run = tf.function(lambda y: tfaca.odeint(lambda t, y: -y, y, [0.0, 1.0]))
    run.get_concrete_function(tf.TensorSpec([None, 2], tf.float32))
    assert not _tf32()
    tf.config.experimental.enable_tensor_float_32_execution(True)
    layer = tfaca.ODELayer(keras.layers.Dense(2))
    assert layer.precision == "float32" and layer.get_config()["precision"] == "float32"
    layer(tf.ones([3, 2]))
    assert not _tf32()


def test_float32_gradients_meet_the_tolerance_on_every_device():
    """An MLP field in float32 (48 -> 96 tanh -> 48, batch 64, the benchmark's sizes) at
    rtol = 1e-5: ACA's weight gradients against the float64 solve at 1e-10 (5.9e-6 and
    4.9e-6 relative on a CPU). Rounding only the forward products' inputs to TF32's
    10-bit mantissas, as a GPU with TF32 on does, gives 3.1e-4 and 2.8e-4 here."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(48, 96)) / np.sqrt(48)
    w2 = rng.normal(size=(96, 48)) / np.sqrt(96)
    y0 = rng.normal(size=(64, 48))

    def gradient(dtype, tol):
        a, b = tf.Variable(w1, dtype=dtype), tf.Variable(w2, dtype=dtype)
        with tf.GradientTape() as tape:
            ys = tfaca.odeint(lambda t, y: tf.tanh(y @ a) @ b, tf.constant(y0, dtype),
                              [0.0, 1.0], rtol=tol, atol=tol / 10)
            loss = tf.reduce_sum(ys[-1] ** 2)
        return [g.numpy() for g in tape.gradient(loss, [a, b])]

    exact = gradient(tf.float64, 1e-10)
    for got, want in zip(gradient(tf.float32, 1e-5), exact):
        assert relative_error(got, want) < 5e-5

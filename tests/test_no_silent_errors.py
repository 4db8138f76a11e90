"""Gradients right wherever users put a solve, or a clear refusal (never a silent wrong
number): a solve inside a `tf.while_loop` or a `tf.cond` branch reading variables,
second derivatives, randomness in `func`, tensors `func` closes over, argument
conversions, the adjoint with `throw=False` and its counters after a graph, and
`max_steps` below the number of output intervals."""

import keras
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

import tfaca
from helpers import (
    A_NP, MODES, accepted_steps, assert_grads_close, f64, frechet_expm, strategy, unrolled_solve,
)

F64 = tf.float64
Y0_NP = np.array([1.0, 0.5, -0.3])
TS_NP = np.array([0.0, 0.6, 1.3])


def tanh_field(t, y, W):
    return tf.tanh(tf.linalg.matvec(W, y)) - 0.1 * y


# --------------------------------------------------------------------------------------
# 1. A solve inside a tf.while_loop (tf.scan, a Keras RNN) whose func reads variables.


def _scan_gradient(mode, compile_mode):
    """d/dW of a loss over three chained solves in `tf.scan`, W a tf.Variable."""
    W = tf.Variable(A_NP)
    ts = f64([0.0, 0.4])

    def func(t, y):
        return tf.linalg.matvec(W, y)

    def run(y0):
        with tf.GradientTape() as tape:
            def one(y, _):
                return tfaca.odeint(func, y, ts, rtol=1e-10, atol=1e-12, gradient=strategy(mode))[-1]

            ys = tf.scan(one, tf.zeros([3]), initializer=y0)
            loss = tf.reduce_sum(ys ** 2)
        return tape.gradient(loss, W)

    if compile_mode != "eager":
        run = tf.function(run, jit_compile=compile_mode == "xla")
    return run(f64(Y0_NP)).numpy()


def _scan_analytic():
    """The same loss by expm: y_k = expm(0.4 A)^k y0, and its gradient in A."""
    E = scipy.linalg.expm(0.4 * A_NP)
    ys, y = [], Y0_NP
    for _ in range(3):
        y = E @ y
        ys.append(y)
    # dL/dE = sum_k sum_{m<=k} (E^T)^(k-m) 2 y_k y_{m-1}^T, then through expm's Fréchet derivative.
    prev = [Y0_NP] + ys[:-1]
    dE = np.zeros((3, 3))
    for k in range(3):
        a = 2 * ys[k]
        for m in range(k, -1, -1):
            dE += np.outer(a, prev[m])
            a = E.T @ a
    # <dE, dexpm(0.4 A)[H]>: the adjoint of the Fréchet derivative is the Fréchet
    # derivative at A^T.
    return 0.4 * frechet_expm(0.4 * A_NP.T, dE)


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "mode, compile_mode",
    [("aca", "function"), ("adjoint", "function"), ("naive", "function"), ("aca", "xla"),
     pytest.param("adjoint", "xla", marks=SLOW), pytest.param("naive", "xla", marks=SLOW)],
)
@pytest.mark.slow_variants
def test_solve_in_scan_reads_a_variable(mode, compile_mode):
    got = _scan_gradient(mode, compile_mode)
    np.testing.assert_allclose(got, _scan_analytic(), rtol=1e-7)


@pytest.mark.slow
def test_solve_in_scan_with_adjoint_counters():
    """An AdjointGradient built outside (it holds counter variables) works in a loop too."""
    grad = tfaca.AdjointGradient()
    W = tf.Variable(A_NP)

    @tf.function
    def run(y0):
        with tf.GradientTape() as tape:
            def one(y, _):
                return tfaca.odeint(lambda t, y: tf.linalg.matvec(W, y), y, f64([0.0, 0.4]),
                                    rtol=1e-10, atol=1e-12, gradient=grad)[-1]

            loss = tf.reduce_sum(tf.scan(one, tf.zeros([3]), initializer=y0) ** 2)
        return tape.gradient(loss, W)

    np.testing.assert_allclose(run(f64(Y0_NP)).numpy(), _scan_analytic(), rtol=1e-7)
    assert int(grad.backward_stats.num_fevals) > 0


class _ODECell(keras.layers.Layer):
    """An ODE-RNN cell: between observations the hidden state follows a learned ODE."""

    def __init__(self, units, gradient, use_layer, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units
        self.dynamics = keras.layers.Dense(units, activation="tanh")
        self.update = keras.layers.Dense(units)
        if use_layer:
            self.ode = tfaca.ODELayer(self.dynamics, t=(0.0, 0.5), gradient=gradient)
        else:
            self.ode = lambda h: tfaca.odeint(lambda t, y: self.dynamics(y), h, [0.0, 0.5],
                                              gradient=gradient)[-1]

    def build(self, input_shape):
        self.dynamics.build((None, self.units))
        self.update.build((None, input_shape[-1] + self.units))

    def call(self, x, states):
        h = tf.tanh(self.update(tf.concat([x, self.ode(states[0])], -1)))
        return h, [h]


@pytest.mark.parametrize(
    "mode, use_layer",
    [("aca", True), ("adjoint", False), pytest.param("aca", False, marks=SLOW),
     pytest.param("adjoint", True, marks=SLOW)],
)
@pytest.mark.slow
@pytest.mark.slow_variants
def test_keras_rnn_with_an_ode_cell_trains(mode, use_layer):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5, 3)).astype("float32")
    y = x.sum(axis=(1, 2))[:, None].astype("float32")
    cell = _ODECell(8, mode, use_layer)
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.RNN(cell), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    kernel = cell.dynamics.kernel.numpy().copy()
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    # The ODE's own weights were trained, not only the update's.
    assert not np.allclose(cell.dynamics.kernel.numpy(), kernel)


# --------------------------------------------------------------------------------------
# 1b. A solve inside a tf.cond branch (alone, or in a loop body) whose func reads
# variables: TensorFlow's cond gradient could not reach the variables the backward pass
# reads ("Tensor.graph is undefined when eager execution is enabled").


def _cond_gradient(mode, compile_mode, nest, pred):
    W = tf.Variable(A_NP)
    gradient = strategy(mode)  # built outside: the adjoint's counters are written too

    def solve(y, t1):
        return tfaca.odeint(lambda t, y: tf.linalg.matvec(W, y), y, f64([0.0, t1]),
                            rtol=1e-10, atol=1e-12, gradient=gradient)[-1]

    @tf.function(jit_compile=compile_mode == "xla")
    def run(pred, y0):
        with tf.GradientTape() as tape:
            if nest == "cond":
                ys = tf.cond(pred, lambda: solve(y0, 0.6), lambda: y0)
            elif nest == "where":  # both solved outside any cond, one selected
                ys = tf.where(pred, solve(y0, 0.6), y0)
            else:  # a cond in a loop body, as in an RNN cell that skips some steps
                ys = tf.scan(lambda y, _: tf.cond(pred, lambda: solve(y, 0.4), lambda: y),
                             tf.zeros([3]), initializer=y0)
            loss = tf.reduce_sum(ys ** 2)
        return tape.gradient(loss, W, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    return run(tf.constant(pred), f64(Y0_NP)).numpy()


def _cond_analytic():
    """d/dA of |expm(0.6 A) y0|^2."""
    y1 = scipy.linalg.expm(0.6 * A_NP) @ Y0_NP
    return 0.6 * frechet_expm(0.6 * A_NP.T, 2 * np.outer(y1, Y0_NP))


@pytest.mark.parametrize(
    "mode, compile_mode, nest",
    [("aca", "function", "cond"), ("adjoint", "function", "cond"),
     ("naive", "function", "cond"), ("aca", "xla", "cond"), ("adjoint", "xla", "cond"),
     ("aca", "function", "cond_in_scan"), ("adjoint", "function", "cond_in_scan"),
     # The workaround that `solve` documents for the naive gradient under XLA.
     ("naive", "xla", "where")],
)
@pytest.mark.slow_variants
def test_solve_in_a_cond_branch_reads_a_variable(mode, compile_mode, nest):
    expected = _scan_analytic() if nest == "cond_in_scan" else _cond_analytic()
    np.testing.assert_allclose(_cond_gradient(mode, compile_mode, nest, True), expected,
                               rtol=1e-7)
    np.testing.assert_array_equal(_cond_gradient(mode, compile_mode, nest, False), 0.0)


# --------------------------------------------------------------------------------------
# 2. Second derivatives.


def _hvp(loss_fn, x, v):
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = loss_fn(x)
        g = inner.gradient(loss, x)
    return outer.gradient(g, x, output_gradients=v)


@pytest.mark.parametrize(
    "compile_mode, wrt",
    [("eager", "y0"), ("eager", "W"), ("eager", "ts"), ("function", "y0"), ("xla", "W"),
     pytest.param("function", "W", marks=SLOW), pytest.param("function", "ts", marks=SLOW),
     pytest.param("xla", "y0", marks=SLOW), pytest.param("xla", "ts", marks=SLOW)],
)
@pytest.mark.slow_variants
def test_aca_hessian_vector_product_is_exact(compile_mode, wrt):
    """ACA's gradient differentiated again equals the second derivative of backprop
    through the same accepted steps (to rounding)."""
    W, y0, ts = f64(A_NP), f64(Y0_NP), f64(TS_NP)
    kwargs = dict(method="bosh3", rtol=1e-5, atol=1e-5)
    steps = accepted_steps(tanh_field, y0, ts, args=(W,), **kwargs)

    def loss_with(solve):
        def loss(x):
            inputs = {"y0": y0, "W": W, "ts": ts}
            inputs[wrt] = x
            ys = solve(inputs)
            return tf.reduce_sum(tf.sin(ys) * f64(np.arange(1.0, 4.0)))

        return loss

    aca = loss_with(lambda i: tfaca.odeint(tanh_field, i["y0"], i["ts"], args=(i["W"],),
                                           interpolate=False, **kwargs))
    ref = loss_with(lambda i: unrolled_solve(tanh_field, i["y0"], i["ts"], steps, args=(i["W"],),
                                             method="bosh3"))
    x = {"y0": y0, "W": W, "ts": ts}[wrt]
    v = f64(np.random.default_rng(1).normal(size=x.shape))
    hvp = _hvp
    if compile_mode != "eager":
        hvp = tf.function(_hvp, jit_compile=compile_mode == "xla")
    assert_grads_close(hvp(aca, x, v), _hvp(ref, x, v), rtol=1e-9, name=f"HVP in {wrt}")


def test_aca_gradient_penalty_of_keras_weights():
    """A gradient penalty (d/dθ of |dL/dy0|^2), θ Keras weights, equals the unrolled one."""
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(3, activation="tanh", dtype="float64")
    dense.build((None, 3))
    y0, ts = f64([Y0_NP, 0.5 * Y0_NP[::-1] + 0.2]), f64(TS_NP)
    func = lambda t, y: dense(y)  # noqa: E731
    kwargs = dict(method="dopri5", rtol=1e-6, atol=1e-6)
    steps = accepted_steps(func, y0, ts, **kwargs)

    def penalty(solve):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(y0)
                loss = tf.reduce_sum(solve() ** 2)
            g = inner.gradient(loss, y0)
            p = tf.reduce_sum(g ** 2)
        return outer.gradient(p, dense.trainable_variables)

    got = penalty(lambda: tfaca.odeint(func, y0, ts, interpolate=False, **kwargs))
    want = penalty(lambda: unrolled_solve(func, y0, ts, steps, method="dopri5"))
    assert_grads_close(got, want, rtol=1e-9, name="penalty")


@pytest.mark.slow
def test_naive_hessian_vector_product_matches_finite_differences():
    y0, W, ts = f64(Y0_NP), f64(A_NP), f64(TS_NP)

    def loss(x):
        return tf.reduce_sum(tfaca.odeint(tanh_field, x, ts, args=(W,), gradient="naive",
                                          method="rk4", step_size=0.05) ** 3)

    v = f64([0.3, -0.2, 0.5])
    got = _hvp(loss, y0, v).numpy()

    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = loss(x)
        return tape.gradient(out, x).numpy()

    h = 1e-5
    fd = (grad(y0 + h * v) - grad(y0 - h * v)) / (2 * h)
    np.testing.assert_allclose(got, fd, rtol=1e-6)


def test_adjoint_second_derivative_raises():
    y0, W, ts = f64(Y0_NP), f64(A_NP), f64(TS_NP)

    def loss(x):
        return tf.reduce_sum(tfaca.odeint(tanh_field, x, ts, args=(W,), gradient="adjoint") ** 2)

    with pytest.raises(NotImplementedError, match="differentiated again.*aca"):
        _hvp(loss, y0, y0)


def test_aca_second_derivative_by_tf_gradients_raises():
    """Without a tape active while the first gradient is built, nothing recorded it:
    `tf.gradients` of it would miss the checkpoints' dependence, so it raises."""
    W, ts = f64(A_NP), f64(TS_NP)

    @tf.function
    def run(y0):
        loss = tf.reduce_sum(tfaca.odeint(tanh_field, y0, ts, args=(W,)) ** 2)
        (g,) = tf.gradients(loss, y0)
        return tf.gradients(tf.reduce_sum(g ** 2), y0)

    with pytest.raises(NotImplementedError, match="nested tf.GradientTape"):
        run(f64(Y0_NP))


# --------------------------------------------------------------------------------------
# 3. Randomness in func: ACA's replay would draw other numbers. Refused, never silent.


def _noisy(t, y):
    return -y + 0.5 * tf.random.uniform(tf.shape(y), dtype=y.dtype)


def _noisy_gradient(compile_mode, throw=True):
    y0, ts = f64(Y0_NP), f64([0.0, 1.0])

    def run(y0):
        with tf.GradientTape() as tape:
            tape.watch(y0)
            ys = tfaca.odeint(_noisy, y0, ts, method="rk4", step_size=0.1, throw=throw)
            loss = tf.reduce_sum(ys[-1])
        return tape.gradient(loss, y0)

    if compile_mode != "eager":
        run = tf.function(run, jit_compile=compile_mode == "xla")
    return run(y0)


@pytest.mark.parametrize("compile_mode", ["eager", "function"])
def test_random_func_is_refused_by_aca(compile_mode):
    with pytest.raises(tf.errors.InvalidArgumentError, match="deterministic function of"):
        _noisy_gradient(compile_mode)


@pytest.mark.parametrize("compile_mode", ["eager", "xla"])
def test_random_func_gives_nan_where_it_cannot_raise(compile_mode):
    throw = compile_mode != "eager"  # XLA cannot raise: NaN either way
    g = _noisy_gradient(compile_mode, throw=throw).numpy()
    assert np.all(np.isnan(g))


def test_randomness_passed_in_args_is_exact():
    """The documented alternative: the noise drawn outside `func`, passed in `args`."""
    y0, ts = f64(Y0_NP), f64([0.0, 1.0])
    noise = f64(np.random.default_rng(0).uniform(size=3))
    with tf.GradientTape() as tape:
        tape.watch(y0)
        loss = tf.reduce_sum(tfaca.odeint(lambda t, y, n: -y + n, y0, ts, args=(noise,),
                                          rtol=1e-10, atol=1e-12)[-1])
    # y(1) = e^-1 y0 + (1 - e^-1) n
    np.testing.assert_allclose(tape.gradient(loss, y0).numpy(), np.exp(-1.0), rtol=1e-8)


# --------------------------------------------------------------------------------------
# 4. Tensors that func closes over.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("compile_mode", ["eager", "function"])
@pytest.mark.slow_variants
def test_closed_over_tensor_gets_its_gradient(mode, compile_mode):
    """y' = -theta * y: y(T) = y0 exp(-theta T), d/dtheta sum y(T) = -T sum y(T)."""
    y0, ts, T = f64(Y0_NP), f64([0.0, 0.8]), 0.8

    def run(theta, scale):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            # `scale` is closed over too but not watched: no gradient is asked of it.
            ys = tfaca.odeint(lambda t, y: -theta * scale * y, y0, ts, rtol=1e-10, atol=1e-12,
                              gradient=strategy(mode))
            loss = tf.reduce_sum(ys[-1])
        return tape.gradient(loss, theta)

    if compile_mode == "function":
        run = tf.function(run)
    theta = f64(1.3)
    g = run(theta, f64(1.0))
    assert g is not None
    np.testing.assert_allclose(float(g), -T * np.sum(Y0_NP) * np.exp(-1.3 * T), rtol=1e-8)


def test_closed_over_and_args_together():
    """A closed-over matrix and an `args` vector: both gradients, against the unrolled
    reference."""
    W, b, y0, ts = f64(A_NP), f64([0.2, -0.1, 0.3]), f64(Y0_NP), f64(TS_NP)
    func = lambda t, y, b: tanh_field(t, y, W) + b  # noqa: E731
    steps = accepted_steps(func, y0, ts, args=(b,), method="dopri5", rtol=1e-6, atol=1e-6)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([W, b])
        got = tf.reduce_sum(tfaca.odeint(func, y0, ts, args=(b,), rtol=1e-6, atol=1e-6,
                                         interpolate=False) ** 2)
        want = tf.reduce_sum(unrolled_solve(func, y0, ts, steps, args=(b,)) ** 2)
    assert_grads_close(tape.gradient(got, [W, b]), tape.gradient(want, [W, b]), rtol=1e-10)


# --------------------------------------------------------------------------------------
# 8. Argument conversions.


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
# 9. The adjoint with throw=False, and its counters after a graph.


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
    y0, ts = f64(Y0_NP), f64(TS_NP)

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


# --------------------------------------------------------------------------------------
# max_steps below the number of output intervals.


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


# --------------------------------------------------------------------------------------
# Round 2 (issue 25): the edge cases of times per sample, per-sample steps and MALI.

ROT_NP = np.array([[-0.1, 1.0], [-1.0, -0.1]])
WEIGHTS_NP = np.array([[1.0, 2.0], [3.0, 4.0], [-1.0, 0.5]])


def _rotation(t, y):
    return tf.linalg.matvec(f64(ROT_NP), y)


def _end_value(y0, t):
    return scipy.linalg.expm(ROT_NP * t) @ y0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [[[0, 1, 2], [0, 1.5, 2], [0, 0.5, 1]],
                                  [[0, 1, 2], [0, 1, 2], [0, 1, 2]]],
                         ids=["two rows end together", "identical rows"])
def test_rows_ending_together_each_get_their_end_time_gradient(mode, rows):
    """Times per sample, shared steps: rows whose last time is the end of the solve each
    get their own dL/dts (it all went to the first such row, the others 0). Against the
    analytic <dL/dy(t_b), A y(t_b)> for every entry."""
    y0 = np.array([[1.0, 0.5], [0.3, -0.2], [-0.4, 0.8]])
    ts = f64(rows)
    y0_t = f64(y0)
    with tf.GradientTape() as tape:
        tape.watch(ts)
        ys = tfaca.odeint(_rotation, y0_t, ts, rtol=1e-10, atol=1e-12, gradient=strategy(mode))
        loss = tf.reduce_sum(ys[1:] * f64(WEIGHTS_NP))
    g_ts = tape.gradient(loss, ts).numpy()
    rows = np.asarray(rows, float)
    for b in range(3):
        for k in (1, 2):
            y = _end_value(y0[b], rows[b, k])
            expected = WEIGHTS_NP[b] @ (ROT_NP @ y)
            np.testing.assert_allclose(g_ts[b, k], expected, rtol=1e-6, atol=1e-9,
                                       err_msg=f"row {b}, time {k}")


@pytest.mark.parametrize("mode", MODES)
# Shared steps cannot step onto every sample's times: interpolate=False is refused there.
@pytest.mark.parametrize("per_sample,interpolate", [(False, True), (True, True), (True, False)])
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


@pytest.mark.parametrize("interpolate", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_padding_costs_no_step_and_an_all_padding_row_none(interpolate, mode):
    """Per-sample steps: a row that ends in padding takes exactly the steps it takes
    without the padding, a row that is all padding takes none and returns its state,
    and every time gradient is finite (an all-padding row gave NaN: 0/0 for its step of
    size 0; padding with interpolate=False took steps of size 0)."""
    y0 = f64([[1.0, 0.5], [0.3, -0.2], [-0.4, 0.8]])
    ts = f64([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [0.0, 1.5, 1.5]])
    with tf.GradientTape() as tape:
        tape.watch([ts, y0])
        sol = tfaca.solve(_rotation, y0, ts, per_sample=True, interpolate=interpolate,
                          gradient=strategy(mode), rtol=1e-8, atol=1e-10)
        loss = tf.reduce_sum(sol.ys ** 2)
    g_ts, g_y0 = tape.gradient(loss, [ts, y0])
    assert np.all(np.isfinite(g_ts.numpy())) and np.all(np.isfinite(g_y0.numpy()))
    steps = sol.stats.num_steps.numpy()
    alone = tfaca.solve(_rotation, y0[2:], f64([0.0, 1.5]), per_sample=True,
                        interpolate=interpolate, rtol=1e-8, atol=1e-10)
    assert steps[2] == int(alone.stats.num_steps[0])
    assert int(sol.stats.num_fevals[2]) == int(alone.stats.num_fevals[0])
    assert steps[1] == 0
    np.testing.assert_array_equal(sol.ys.numpy()[:, 1], np.tile(y0.numpy()[1], (3, 1)))
    np.testing.assert_array_equal(g_ts.numpy()[1], 0.0)
    np.testing.assert_allclose(sol.ys.numpy()[2, 2], _end_value(y0.numpy()[2], 1.5), rtol=1e-7)


@pytest.mark.parametrize("per_sample", [False, True])
def test_all_padding_batch_returns_the_state(per_sample):
    """Every row of the times all padding (an RNN step in which no time passes, `[0, 0]`
    per row): the solve returns the state unchanged, with no step (it was refused), in a
    Keras RNN cell too."""
    y0 = f64([[1.0, 0.5], [0.25, -0.5]])  # exact in float32, which the RNN's state passes
    sol = tfaca.solve(_rotation, y0, tf.zeros([2, 2], F64), per_sample=per_sample)
    np.testing.assert_array_equal(sol.ys.numpy(), np.stack([y0.numpy()] * 2))
    assert np.all(sol.stats.num_steps.numpy() == 0) and np.all(sol.status.numpy() == 0)

    class Cell(keras.layers.Layer):
        state_size = 2

        def call(self, inputs, states):
            dt = inputs[:, :1]
            times = tf.concat([tf.zeros_like(dt), dt], axis=1)
            y = tfaca.odeint(_rotation, tf.cast(states[0], F64), tf.cast(times, F64),
                             per_sample=per_sample)[-1]
            return y, [y]

    rnn = keras.layers.RNN(Cell(), dtype="float64")
    gaps = np.zeros((2, 3, 1))  # no time passes in any step of any sequence
    out = rnn(gaps, initial_state=[y0])
    np.testing.assert_array_equal(out.numpy(), y0.numpy())


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


@pytest.mark.parametrize("compile_mode", ["eager", "function"])
def test_times_holding_a_variable_get_its_gradient(compile_mode):
    """`odeint(f, y0, [0.0, T])` with `T` a variable: dy(T)/dT = f(T, y(T)) (it was None
    eagerly, an error in a tf.function); also inside 2-D times."""
    T = tf.Variable(2.0, dtype=F64)

    def run():
        with tf.GradientTape() as tape:
            y1 = tfaca.odeint(lambda t, y: -y, f64([1.0]), [0.0, T], rtol=1e-10, atol=1e-12)[-1]
            y2 = tfaca.odeint(lambda t, y: -y, f64([[1.0], [1.0]]), [[0.0, T], [0.0, 1.0]],
                              rtol=1e-10, atol=1e-12)[-1, 0]
        return tape.gradient([y1, y2], T)

    if compile_mode == "function":
        run = tf.function(run)
    np.testing.assert_allclose(float(run()), -2 * np.exp(-2.0), rtol=1e-8)


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

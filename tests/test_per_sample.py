"""Per sample: step control (`per_sample=True`), each sample of a batch solved as if
alone, and output times per sample (`ts` of shape `[batch, n]`, padded rows), in `solve`
and in `ODELayer`.

The reference for a sample is the same sample solved in a batch of one, whose steps are
those of a shared-step solve of that sample alone (tested against backprop through the
same accepted steps in test_aca.py). In a batch with per-sample steps, a sample's
outputs, ACA and naive gradients and statistics must equal those, to rounding (the
batched matmuls round differently from a batch of one), whatever its neighbours are.
"""

import keras
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

import tfaca
from helpers import (
    A_NP, F64, MODES, f64, linear_exact, linear_func, random_per_sample_ts, random_y0,
    relative_error, strategy,
)


def batch_of(dtype):
    """Five ordinary samples, a stiff neighbour (rate 60) and a much larger one."""
    y0 = np.random.RandomState(4).randn(7, 3)  # the same batch whatever the test order
    y0[6] *= 40.0
    rate = np.ones(7)
    rate[5] = 60.0
    return tf.constant(y0, dtype), tf.constant(rate, dtype)


W_NP = np.random.RandomState(3).randn(3, 3) * 0.8


def field(t, y, w, rate):
    """A nonlinear rotation at a rate per sample (`rate` `[batch]`), with explicit time
    dependence: `t` is the sample's own time, `[batch]`."""
    return rate[:, None] * tf.tanh(tf.matmul(y, w)) * (1.0 + 0.3 * tf.reshape(tf.sin(t), [-1, 1]))


def solve_with_grads(y0, rate, ts, dtype, per_sample=True, **kwargs):
    w = tf.constant(W_NP, dtype)
    with tf.GradientTape() as tape:
        tape.watch([y0, w, ts])
        sol = tfaca.solve(field, y0, ts, args=(w, rate), per_sample=per_sample, rtol=1e-6,
                          atol=1e-8, max_steps=4000, **kwargs)
        weights = tf.reshape(tf.range(1, tf.shape(sol.ys)[0] + 1, dtype=dtype), [-1, 1, 1])
        loss = tf.reduce_sum(weights * sol.ys**2)
    g_y0, g_w, g_ts = tape.gradient(loss, [y0, w, ts])
    return sol, g_y0, g_w, g_ts


SETTINGS = [
    ("dopri5", "aca", True),
    ("dopri5", "aca", False),
    ("tsit5", "aca", True),
    ("bosh3", "aca", False),
    ("dopri5", "naive", True),
    ("bosh3", "naive", False),
    ("rk4", "aca", True),
    ("rk4", "aca", False),
    ("dopri5", "adjoint", True),
    ("bosh3", "adjoint", False),
]


@pytest.mark.slow_variants
@pytest.mark.parametrize("method,gradient,interpolate", SETTINGS)
def test_sample_in_batch_equals_sample_alone_float64(method, gradient, interpolate):
    dtype = tf.float64
    y0, rate = batch_of(dtype)
    ts = tf.constant([0.0, 0.4, 1.1, 1.5], dtype)
    step = {"step_size": 0.01} if method == "rk4" else {}
    kwargs = dict(method=method, gradient=gradient, interpolate=interpolate, **step)
    sol, g_y0, g_w, g_ts = solve_with_grads(y0, rate, ts, dtype, **kwargs)
    g_w_alone, g_ts_alone = 0.0, 0.0
    for b in range(7):
        one, g_y0_1, g_w_1, g_ts_1 = solve_with_grads(y0[b:b + 1], rate[b:b + 1], ts, dtype,
                                                      **kwargs)
        assert relative_error(sol.ys[:, b], one.ys[:, 0]) < 1e-12, b
        assert relative_error(g_y0[b], g_y0_1[0]) < 1e-12, b
        for field_name in ("num_steps", "num_rejected", "num_fevals", "num_fevals_backward"):
            got = getattr(sol.stats, field_name)
            want = getattr(one.stats, field_name)
            assert int(np.asarray(got)[b]) == int(np.asarray(want)[0]), (field_name, b)
        assert int(sol.status[b]) == 0 and float(sol.t_final[b]) == 1.5
        g_w_alone += g_w_1
        g_ts_alone += g_ts_1
        if b in (0, 5) and gradient != "adjoint":
            # Alone, per-sample steps are the shared ones, whose ACA gradient equals
            # backprop through the accepted steps (test_gradients.py).
            shared, g_y0_s, g_w_s, g_ts_s = solve_with_grads(
                y0[b:b + 1], rate[b:b + 1], ts, dtype, per_sample=False, **kwargs)
            assert relative_error(one.ys, shared.ys) < 1e-12
            for got, want in ((g_y0_1, g_y0_s), (g_w_1, g_w_s), (g_ts_1, g_ts_s)):
                assert relative_error(got, want) < 1e-12, b
    # The parameters' and the shared times' gradients are the sums over the samples (the
    # adjoint's, from a longer chain of roundings, to a little more).
    summed = 1e-11 if gradient == "adjoint" else 1e-12
    assert relative_error(g_w, g_w_alone) < summed
    assert relative_error(g_ts, g_ts_alone) < summed
    if method != "rk4":
        # The stiff neighbour takes far more steps than the others, who do not pay for it.
        steps = sol.stats.num_steps.numpy()
        assert steps[5] > 2 * max(steps[:5])


@pytest.mark.slow  # 9-18 s, the float64 check stays quick (stop 45: CI's limit)
def test_sample_in_batch_equals_sample_alone_float32():
    dtype = tf.float32
    y0, rate = batch_of(dtype)
    ts = tf.constant([0.0, 0.7, 1.5], dtype)
    sol, g_y0, g_w, _ = solve_with_grads(y0, rate, ts, dtype)
    for b in (0, 5, 6):
        one, g_y0_1, _, _ = solve_with_grads(y0[b:b + 1], rate[b:b + 1], ts, dtype)
        assert relative_error(sol.ys[:, b], one.ys[:, 0]) < 1e-5, b
        assert relative_error(g_y0[b], g_y0_1[0]) < 1e-5, b
        assert int(sol.stats.num_steps[b]) == int(one.stats.num_steps[0])


def test_shared_stepping_couples_the_samples():
    """The contrast that motivates per-sample steps: with one step size for the batch, a
    stiff neighbour changes an ordinary sample's steps and outputs."""
    dtype = tf.float64
    y0, rate = batch_of(dtype)
    w = tf.constant(W_NP, dtype)
    ts = tf.constant([0.0, 1.5], dtype)
    shared = tfaca.solve(field, y0, ts, args=(w, rate), rtol=1e-6, atol=1e-8, max_steps=4000,
                         jit_compile=False)
    # `field` reads per-sample times; a shared solve passes a scalar, which broadcasts.
    alone = tfaca.solve(field, y0[:1], ts, args=(w, rate[:1]), rtol=1e-6, atol=1e-8)
    assert int(shared.stats.num_steps) > 3 * int(alone.stats.num_steps)
    assert relative_error(shared.ys[-1, 0], alone.ys[-1, 0]) > 1e-8


def per_sample_times():
    # Rows: each sample's own times (padding repeats its last), all from 0.
    return np.array([[0.0, 0.5, 1.3, 2.0], [0.0, 0.2, 0.2, 0.2], [0.0, 1.0, 3.0, 3.0],
                     [0.0, 0.1, 0.2, 0.3]])


@pytest.mark.slow_variants
@pytest.mark.parametrize("interpolate", [True, False])
def test_times_per_sample_each_sample_stops_at_its_own(interpolate):
    """`dy/dt = cos(t)`: each sample gets its own time, `[batch]`, and its own times."""
    dtype = tf.float64
    seen = []

    def func(t, y):
        seen.append(t.shape.as_list())
        return tf.cos(t)[:, None] * tf.ones_like(y)

    ts = tf.constant(per_sample_times(), dtype)
    y0 = tf.zeros([4, 2], dtype)
    sol = tfaca.solve(func, y0, ts, per_sample=True, rtol=1e-9, atol=1e-12,
                      interpolate=interpolate)
    assert all(shape == [4] for shape in seen)
    expected = np.sin(per_sample_times()).T[:, :, None] * np.ones(2)
    np.testing.assert_allclose(sol.ys.numpy(), expected, atol=1e-7)
    np.testing.assert_array_equal(sol.t_final.numpy(), per_sample_times()[:, -1])
    # A sample that ends sooner takes fewer steps: it stops at its own last time.
    steps = sol.stats.num_steps.numpy()
    assert steps[1] < steps[2]


@pytest.mark.slow_variants
@pytest.mark.parametrize("per_sample,interpolate", [(True, True), (True, False), (False, True)])
def test_adjoint_agrees_with_aca_and_times_reach_the_last_real_time(per_sample, interpolate):
    """At tight tolerances the adjoint's gradient (per sample: its own reverse solve per
    sample, the parameters' by quadrature) agrees with ACA's, every time included. A row
    whose last times are padding ends its solve (per sample), or the whole solve (the
    farthest row, shared): the end's gradient reaches its last real time, not the
    padding (this was lost before, with shared steps too)."""
    dtype = tf.float64
    w = tf.constant(W_NP, dtype)
    y0 = tf.constant(np.random.RandomState(5).randn(4, 3), dtype)
    rate = tf.constant([1.0, 1.0, 8.0, 1.0], dtype)
    ts = tf.constant([[0.0, 0.5, 1.3, 1.3], [0.0, 0.2, 0.2, 0.2], [0.0, 0.4, 0.6, 0.9],
                      [0.0, 0.1, 0.2, 0.3]], dtype)
    grads = {}
    for gradient in ("aca", "adjoint"):
        with tf.GradientTape() as tape:
            tape.watch([y0, w, ts])
            ys = tfaca.odeint(field, y0, ts, args=(w, rate), per_sample=per_sample,
                              interpolate=interpolate, rtol=1e-8, atol=1e-10,
                              gradient=gradient)
            loss = tf.reduce_sum(ys**2)
        grads[gradient] = tape.gradient(loss, [y0, w, ts])
    for aca, adjoint in zip(grads["aca"], grads["adjoint"]):
        assert relative_error(adjoint, aca) < 1e-5
    g_ts = grads["aca"][2].numpy()
    assert abs(g_ts[0, 2]) > 1e-3 and abs(g_ts[1, 1]) > 1e-3  # last real times
    assert g_ts[0, 3] == 0.0 and np.all(g_ts[1, 2:] == 0.0)  # padding


def test_failure_is_per_sample():
    """dy/dt = y^2 blows up at t = 1/y0: the sample that blows up fails alone; the others'
    outputs are correct, and `throw=True` names the sample."""
    dtype = tf.float64
    y0 = tf.constant([[0.5], [4.0], [0.25]], dtype)
    ts = tf.constant([0.0, 1.0], dtype)
    func = lambda t, y: y**2  # noqa: E731
    run = tf.function(lambda y0: tfaca.solve(func, y0, ts, per_sample=True, throw=False,
                                             rtol=1e-8, atol=1e-10))
    sol = run(y0)
    status = sol.status.numpy()
    assert status[0] == 0 and status[2] == 0 and status[1] != 0
    exact = 1.0 / (1.0 / y0.numpy()[[0, 2], 0] - 1.0)
    np.testing.assert_allclose(sol.ys.numpy()[-1, [0, 2], 0], exact, rtol=1e-6)
    assert np.isnan(sol.ys.numpy()[-1, 1, 0])
    assert float(sol.t_final[1]) < 0.26
    with pytest.raises(tfaca.SolveError, match="sample 1"):
        tfaca.solve(func, y0, ts, per_sample=True, rtol=1e-8, atol=1e-10, max_steps=40)


def test_naive_gradient_error_does_not_grow_with_the_batch():
    """Naive backprop carries the step-size choice's derivative: with one step size it
    mixes the samples (its error grows with the batch); per sample it is each sample's
    own, the same in a batch of any size."""
    dtype = tf.float64
    w = tf.constant(W_NP, dtype)
    ys = tf.constant(np.random.RandomState(5).randn(64, 3), dtype)
    ts = tf.constant([0.0, 2.0], dtype)

    def grad_of_first(batch):
        y0 = ys[:batch]
        with tf.GradientTape() as tape:
            tape.watch(y0)
            sol = tfaca.solve(field, y0, ts, args=(w, tf.ones([batch], dtype)), per_sample=True,
                              gradient="naive", rtol=1e-3, atol=1e-6)
            loss = tf.reduce_sum(sol.ys[-1] ** 2)
        return tape.gradient(loss, y0)[0].numpy()

    alone = grad_of_first(1)
    for batch in (8, 64):
        assert relative_error(grad_of_first(batch), alone) < 1e-12, batch


@pytest.mark.slow_variants
@pytest.mark.parametrize("jit_compile", [True, False])
def test_graph_and_xla_equal_eager_and_trace_once(jit_compile):
    # float64: in float32, XLA's other rounding can flip a borderline accept decision.
    dtype = tf.float64
    y0, rate = batch_of(dtype)
    ts = tf.constant([0.0, 0.5, 1.5], dtype)
    w = tf.constant(W_NP, dtype)
    traces = []

    def run(y0, rate, jit):
        with tf.GradientTape() as tape:
            tape.watch([y0, w])
            sol = tfaca.solve(field, y0, ts, args=(w, rate), per_sample=True, rtol=1e-5,
                              atol=1e-7, jit_compile=jit)
            loss = tf.reduce_sum(sol.ys**2)
        return [sol.ys, *tape.gradient(loss, [y0, w]), sol.stats.num_steps]

    eager = run(y0, rate, False)

    @tf.function(jit_compile=jit_compile, input_signature=[
        tf.TensorSpec([None, 3], dtype), tf.TensorSpec([None], dtype)])
    def graph(y0, rate):
        traces.append(1)
        return run(y0, rate, "auto")

    for got, want in zip(graph(y0, rate), eager):
        # Rounding, amplified over the stiff neighbour's hundreds of steps (XLA fuses
        # differently): 1.5e-10 relative seen.
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-8, atol=1e-10)
    graph(y0[:3], rate[:3])  # another batch size: no retrace
    assert len(traces) == 1


def test_bad_arguments():
    y0 = tf.zeros([2, 3])
    ts = [0.0, 1.0]
    func = lambda t, y: -y  # noqa: E731
    with pytest.raises(TypeError, match="per_sample"):
        tfaca.solve(func, y0, ts, per_sample="yes")
    with pytest.raises(ValueError, match="per_sample"):
        tfaca.solve(func, tf.zeros([]), ts, per_sample=True)


def test_second_derivative_is_refused_not_wrong():
    y0 = tf.constant([[1.0, 0.5]], tf.float64)
    with tf.GradientTape() as outer:
        outer.watch(y0)
        with tf.GradientTape() as inner:
            inner.watch(y0)
            ys = tfaca.odeint(lambda t, y: -y * y, y0, [0.0, 1.0], per_sample=True)
            loss = tf.reduce_sum(ys[-1] ** 2)
        g = inner.gradient(loss, y0)
    with pytest.raises(NotImplementedError, match="per-sample"):
        outer.gradient(g, y0)


# --------------------------------------------------------------------------------------
# Times per sample
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gradient", ["aca", "naive", "adjoint"])
@pytest.mark.slow_variants
def test_per_sample_times_match_solving_each_sample_alone(gradient):
    func = linear_func(A_NP)
    ts = random_per_sample_ts()
    y0 = random_y0(batch=4)
    sol = tfaca.solve(func, y0, ts, rtol=1e-10, atol=1e-12, gradient=gradient, max_steps=5000)
    assert sol.ys.shape == (6, 4, 3)
    np.testing.assert_allclose(sol.ys.numpy(), linear_exact(y0, ts), atol=1e-8)
    for b in range(4):
        row = ts[b][:4] if b == 2 else ts[b]
        alone = tfaca.odeint(func, y0[b], row, rtol=1e-10, atol=1e-12, max_steps=5000)
        np.testing.assert_allclose(sol.ys.numpy()[: len(row), b], alone.numpy(), atol=1e-9)
    # Padding returns the last real state.
    np.testing.assert_array_equal(sol.ys.numpy()[4:, 2], sol.ys.numpy()[[3, 3], 2])


@pytest.mark.parametrize("gradient", ["aca", "naive", "adjoint"])
@pytest.mark.slow
def test_per_sample_gradients_and_padding(gradient):
    """Per-sample gradients equal those of each sample solved alone (to the tolerance);
    padded entries receive no gradient and pass none on."""
    func = linear_func(A_NP)
    ts = random_per_sample_ts()
    y0 = random_y0(batch=4)
    @tf.function
    def grads(y0, ts):
        with tf.GradientTape() as tape:
            tape.watch([y0, ts])
            ys = tfaca.odeint(func, y0, ts, rtol=1e-10, atol=1e-12, gradient=gradient,
                              max_steps=5000)
            loss = tf.reduce_sum(ys ** 3)
        return tape.gradient(loss, [y0, ts])

    g_y0, g_ts = grads(y0, tf.constant(ts))
    assert np.all(g_ts.numpy()[2, 4:] == 0.0)
    total_t0 = 0.0
    for b in range(4):
        n = 4 if b == 2 else 6
        gb_y0, gb_ts = grads(y0[b], tf.constant(ts[b][:n]))
        np.testing.assert_allclose(g_y0.numpy()[b], gb_y0.numpy(), rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(g_ts.numpy()[b, 1:n], gb_ts.numpy()[1:], rtol=1e-7, atol=1e-9)
        total_t0 += gb_ts.numpy()[0]
    # The common start's gradient goes to ts[0, 0].
    np.testing.assert_allclose(g_ts.numpy()[0, 0], total_t0, rtol=1e-7)
    assert np.all(g_ts.numpy()[1:, 0] == 0.0)


@pytest.mark.slow
def test_adjoint_per_sample_times_in_fit_with_a_batch_of_known_size():
    """`fit` on one batch of known size traces a static batch with times of unknown
    count: the adjoint's event loop keeps its loop shapes (it used to fail: "enters the
    loop with shape (1, 3), but has shape (None, 3) after one iteration")."""
    import keras

    keras.utils.set_random_seed(0)
    state, times = keras.Input((3,), dtype="float64"), keras.Input((None,), dtype="float64")
    dynamics = keras.Sequential([keras.layers.Dense(3, dtype="float64")])
    ode = tfaca.ODELayer(dynamics, gradient="adjoint", return_sequences=True, dtype="float64")
    model = keras.Model([state, times], ode([state, times]))
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    ts = np.linspace(0.0, 1.0, 6)[None]
    history = model.fit([np.ones((1, 3)), ts], np.zeros((1, 6, 3)), epochs=2, batch_size=1,
                        verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_padded_entries_pass_no_gradient_to_the_state():
    func = linear_func(A_NP)
    ts = random_per_sample_ts()
    y0 = random_y0(batch=4)
    with tf.GradientTape() as tape:
        tape.watch(y0)
        ys = tfaca.odeint(func, y0, ts)
        only_padding = tf.reduce_sum(ys[4:, 2])
    assert np.all(tape.gradient(only_padding, y0, unconnected_gradients="zero").numpy() == 0.0)


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.slow_variants
def test_per_sample_in_graphs_without_retracing(mode):
    func = linear_func(A_NP)
    traces = []

    @tf.function(jit_compile=mode == "xla")
    def run(y0, ts):
        traces.append(1)
        with tf.GradientTape() as tape:
            tape.watch(y0)
            ys = tfaca.odeint(func, y0, ts, rtol=1e-8, atol=1e-10, max_steps=500)
        return ys, tape.gradient(tf.reduce_sum(ys ** 2), y0)

    y0 = random_y0(batch=4)
    for seed in (0, 1, 2):
        ts = random_per_sample_ts(seed=seed)
        ys, g = run(y0, tf.constant(ts))
        np.testing.assert_allclose(ys.numpy(), linear_exact(y0, ts), atol=1e-6)
        eager = tfaca.odeint(func, tf.Variable(y0), ts, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(ys.numpy(), eager.numpy(), rtol=1e-12, atol=1e-12)
    assert len(traces) == 1


def test_per_sample_float32_and_nested():
    func = lambda t, y: (tf.linalg.matvec(tf.constant(A_NP, tf.float32), y[0]), -y[1])  # noqa: E731
    y0 = (random_y0(batch=4, dtype=tf.float32), tf.ones([4, 2], tf.float32))
    ts = random_per_sample_ts().astype(np.float32)
    ys = tfaca.odeint(func, y0, ts, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ys[0].numpy(), linear_exact(y0[0].numpy().astype(np.float64), ts),
                               atol=2e-5)
    np.testing.assert_allclose(ys[1].numpy(), np.exp(-ts.T)[:, :, None] * np.ones(2), rtol=2e-5)


def test_per_sample_reverse_time():
    ts = -random_per_sample_ts()
    y0 = random_y0(batch=4)
    ys = tfaca.odeint(linear_func(A_NP), y0, ts, rtol=1e-10, atol=1e-12, max_steps=5000)
    np.testing.assert_allclose(ys.numpy(), linear_exact(y0, ts), atol=1e-8)


@pytest.mark.parametrize(
    "bad",
    [
        "unequal starts",
        "not monotone",
        "padding in the middle",
        "mixed directions",
    ],
)
@pytest.mark.slow_variants
def test_bad_per_sample_times_are_refused(bad):
    ts = random_per_sample_ts(pad_row=None)
    if bad == "unequal starts":
        ts[1, 0] = 0.1
    elif bad == "not monotone":
        ts[1, [2, 3]] = ts[1, [3, 2]]
    elif bad == "padding in the middle":
        ts[1, 2] = ts[1, 1]
    else:
        ts[1, 1:] = -ts[1, 1:]
    func = linear_func(A_NP)
    y0 = random_y0(batch=4)
    with pytest.raises(ValueError, match=r"`ts` of shape \(batch, n\)"):
        tfaca.odeint(func, y0, ts)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`ts` of shape \(batch, n\)"):
        tf.function(lambda ts: tfaca.odeint(func, y0, ts))(tf.constant(ts))
    sol = tf.function(lambda ts: tfaca.solve(func, y0, ts, throw=False), jit_compile=True)(
        tf.constant(ts))
    assert int(sol.status) == int(tfaca.Status.NONFINITE)
    assert np.all(np.isnan(sol.ys.numpy()[1:]))


def test_per_sample_argument_errors():
    func = linear_func(A_NP)
    with pytest.raises(ValueError, match="interpolate=False"):
        tfaca.odeint(func, random_y0(batch=4), random_per_sample_ts(), interpolate=False)
    with pytest.raises(ValueError, match="leading axis"):
        tfaca.odeint(func, random_y0(batch=3), random_per_sample_ts())
    with pytest.raises(TypeError, match="interpolate"):
        tfaca.odeint(func, random_y0(), [0.0, 1.0], interpolate="yes")


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
@pytest.mark.slow_variants
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


# --------------------------------------------------------------------------------------
# ODELayer
# --------------------------------------------------------------------------------------


class RateTimesTime(keras.layers.Layer):
    """dy/dt = t * y with `t` each sample's own time, `(batch,)`."""

    def call(self, y, t):
        assert t.shape.rank == 1
        return y * tf.cast(t, y.dtype)[:, None]


def test_layer_passes_each_sample_its_time():
    layer = tfaca.ODELayer(RateTimesTime(), t=(0.0, 1.0), rtol=1e-8, atol=1e-10, per_sample=True,
                           dtype="float64")
    y0 = np.random.default_rng(0).normal(size=(6, 3))
    np.testing.assert_allclose(layer(y0), y0 * np.exp(0.5), rtol=1e-7)
    ts = np.array([[0.0, 1.0], [0.0, 2.0], [0.0, 0.5]])
    out = layer([y0[:3], ts])
    np.testing.assert_allclose(out, y0[:3] * np.exp(ts[:, 1:] ** 2 / 2), rtol=1e-7)


def _model(per_sample):
    keras.utils.set_random_seed(0)
    dynamics = keras.Sequential([keras.layers.Dense(16, activation="tanh", dtype="float64"),
                                 keras.layers.Dense(4, dtype="float64")])
    return keras.Sequential([
        keras.Input((4,), dtype="float64"),
        keras.layers.Dense(4, dtype="float64"),
        tfaca.ODELayer(dynamics, t=(0.0, 2.0), per_sample=per_sample, dtype="float64"),
        keras.layers.Dense(1, dtype="float64"),
    ])


def test_layer_fits_and_serves_predictions_independent_of_the_batch(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)) * np.linspace(0.2, 3.0, 64)[:, None]
    y = np.sin(x[:, :1]) + x[:, 1:2]
    model = _model(per_sample=True)
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["loss"])) and history["loss"][-1] < history["loss"][0]
    assert model.layers[1].get_config()["per_sample"] is True

    export_dir = str(tmp_path / "served")
    model.export(export_dir, verbose=False)
    served = tf.saved_model.load(export_dir)
    serve = served.serve
    in_batch = serve(tf.constant(x)).numpy()
    # (Not `predict`: Keras feeds it NumPy inputs as float32.)
    np.testing.assert_allclose(in_batch, model(x).numpy(), rtol=1e-12)
    for b in (0, 31, 63):
        alone = serve(tf.constant(x[b:b + 1])).numpy()
        assert relative_error(alone[0], in_batch[b]) < 1e-12, b

    # The contrast: the same weights with one step size for the batch.
    shared = _model(per_sample=False)
    shared.set_weights(model.get_weights())
    batch_out = shared(x).numpy()
    gaps = [relative_error(shared(x[b:b + 1]).numpy()[0], batch_out[b]) for b in (0, 31, 63)]
    assert max(gaps) > 1e-8


@pytest.mark.slow_variants
@pytest.mark.parametrize("interpolate", [True, False], ids=["dense", "land"])
def test_a_neighbours_overflowing_trial_leaves_the_gradients_finite(interpolate):
    """A sample whose first trials overflow (y' = -w y^3 from y = 10 with a first step of
    100) is rejected while its neighbour steps on: the replay of such an entry rebuilds the
    rejected sample's step with size 0, so that its zero cotangents meet no infinity
    (0 * inf made the gradient of `w` NaN). The batch's gradients are each sample's alone."""
    w = tf.Variable(1.0, dtype=tf.float64)
    ts = tf.constant([0.0, 0.5, 1.0, 2.0], tf.float64)

    def run(y0):
        with tf.GradientTape() as tape:
            tape.watch(y0)
            sol = tfaca.solve(lambda t, y: -w * y**3, y0, ts, per_sample=True,
                              interpolate=interpolate, first_step=100.0, rtol=1e-8, atol=1e-8)
            loss = tf.reduce_sum(sol.ys**2)
        return sol, tape.gradient(loss, [y0, w])

    y0 = tf.constant([[10.0], [0.1]], tf.float64)
    sol, (g_y0, g_w) = run(y0)
    assert int(sol.stats.num_rejected[0]) > 0 and int(sol.stats.num_rejected[1]) == 0
    alone = [run(y0[b:b + 1])[1] for b in range(2)]
    np.testing.assert_allclose(g_y0.numpy(), np.concatenate([g[0].numpy() for g in alone]),
                               rtol=1e-12)
    np.testing.assert_allclose(float(g_w), sum(float(g[1]) for g in alone), rtol=1e-12)


def _series_model(gradient="aca", return_sequences=True):
    import keras

    state = keras.Input((3,))
    times = keras.Input((6,))
    dynamics = keras.Sequential([keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])
    layer = tfaca.ODELayer(dynamics, gradient=gradient, return_sequences=return_sequences,
                           rtol=1e-6, atol=1e-8)
    return keras.Model([state, times], layer([state, times])), layer


@pytest.mark.parametrize("gradient", ["aca", "adjoint"])
@pytest.mark.slow
def test_odelayer_per_sample_times_fit_and_match_single_samples(gradient):
    import keras

    keras.utils.set_random_seed(0)
    model, layer = _series_model(gradient)
    rng = np.random.default_rng(0)
    y0 = rng.standard_normal((32, 3)).astype("float32")
    ts = np.concatenate([random_per_sample_ts(batch=4, seed=s) for s in range(8)]).astype("float32")
    out = model.predict([y0, ts], verbose=0)
    assert out.shape == (32, 6, 3)
    for b in (0, 2, 5):
        n = 4 if b % 4 == 2 else 6
        alone = model.predict([y0[b:b + 1], ts[b:b + 1]], verbose=0)
        np.testing.assert_allclose(out[b, :n], alone[0, :n], rtol=2e-3, atol=2e-4)
        row = tfaca.odeint(lambda t, y: layer.dynamics(y), y0[b:b + 1], ts[b, :n], rtol=1e-6,
                           atol=1e-8)
        np.testing.assert_allclose(out[b, :n], row.numpy()[:, 0], rtol=2e-3, atol=2e-4)
    target = np.sin(ts)[:, :, None] * np.ones(3, "float32")
    model.compile("adam", "mse")
    history = model.fit([y0, ts], target, epochs=3, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.slow
def test_odelayer_interpolate_config_and_savedmodel(tmp_path):
    import keras

    model, layer = _series_model()
    config = layer.get_config()
    assert config["interpolate"] is True
    clone = tfaca.ODELayer.from_config({**config, "interpolate": False})
    assert clone.interpolate is False
    rng = np.random.default_rng(1)
    y0 = rng.standard_normal((4, 3)).astype("float32")
    ts = random_per_sample_ts().astype("float32")
    expected = model.predict([y0, ts], verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict([y0, ts], verbose=0), expected, rtol=1e-6)
    export = str(tmp_path / "served")
    model.export(export, verbose=False)
    served = tf.saved_model.load(export)
    np.testing.assert_allclose(served.serve([y0, ts]).numpy(), expected, rtol=1e-5, atol=1e-6)

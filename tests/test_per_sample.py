"""Per-sample step control (`per_sample=True`): each sample of a batch solved as if alone.

The reference for a sample is the same sample solved in a batch of one, whose steps are
those of a shared-step solve of that sample alone (tested against backprop through the
same accepted steps in test_gradients.py). In a batch with per-sample steps, a sample's
outputs, ACA and naive gradients and statistics must equal those, to rounding (the
batched matmuls round differently from a batch of one), whatever its neighbours are.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import relative_error

W_NP = np.random.RandomState(3).randn(3, 3) * 0.8


def field(t, y, w, rate):
    """A nonlinear rotation at a rate per sample (`rate` `[batch]`), with explicit time
    dependence: `t` is the sample's own time, `[batch]`."""
    return rate[:, None] * tf.tanh(tf.matmul(y, w)) * (1.0 + 0.3 * tf.reshape(tf.sin(t), [-1, 1]))


def batch_of(dtype):
    """Five ordinary samples, a stiff neighbour (rate 60) and a much larger one."""
    y0 = np.random.RandomState(4).randn(7, 3)  # the same batch whatever the test order
    y0[6] *= 40.0
    rate = np.ones(7)
    rate[5] = 60.0
    return tf.constant(y0, dtype), tf.constant(rate, dtype)


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


# ---------------------------------------------------------------------------------------
# ODELayer


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

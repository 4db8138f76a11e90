"""Dense output: outputs interpolated between the accepted steps, their exact gradients,
and output times per sample."""

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import tensorflow as tf
from helpers import (
    A_NP, accepted_steps, assert_grads_close, expm_solution, flat_func, linear_func,
)

import tfaca

F64 = tf.float64


def _y0(batch=None, dtype=F64):
    rng = np.random.default_rng(1)
    shape = (3,) if batch is None else (batch, 3)
    return tf.constant(rng.standard_normal(shape), dtype)


def _per_sample_ts(batch=4, n=6, t1=3.0, seed=0, pad_row=2):
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.uniform(0.0, t1, (batch, n)), axis=1)
    ts[:, 0] = 0.0
    if pad_row is not None:
        ts[pad_row, 4:] = ts[pad_row, 3]  # a sample with fewer observations
    return ts


def _exact(y0, ts):
    """expm solution of y' = A y at each time: `[n, ...]`, per sample when ts is 2-D."""
    y0 = np.asarray(y0)
    ts = np.asarray(ts)
    if ts.ndim == 1:
        return np.stack([expm_solution(A_NP, y0.T, t - ts[0]).T for t in ts])
    return np.stack(
        [[expm_solution(A_NP, y0[b], t - ts[b, 0]) for b, t in enumerate(col)] for col in ts.T]
    )


# ---------------------------------------------------------------------------------------
# The reference: the accepted steps and their interpolants, unrolled under a tape.


def _accepted_dense_steps(func, y0, t0, t1, method, rtol, atol, args=()):
    """The starts and sizes of the accepted steps from t0 to t1 (what interpolation steps
    onto)."""
    steps = accepted_steps(func, y0, [t0, t1], args=args, method=method, rtol=rtol,
                           atol=atol, max_steps=10000)
    return steps.t, steps.dt


def _unrolled_dense(func, y0, ts, starts, sizes, method, args=()):
    """`y(ts)` rebuilt from the accepted steps as a plain taped computation, written
    independently of tfaca's loop and of `_outputs`: each output time is found among the
    steps with NumPy, and its value is `y_i + dt_i sum_s b_s(theta) k_s` with the
    solver's weights evaluated per stage in Python.

    Step starts are `ts[0] + fixed offset`; the last step ends on `ts[-1]`."""
    solver = tfaca.get_solver(method)
    f = flat_func(func, y0, args)
    weights = np.array(solver.dense_weights)  # [stages, degree]
    y = [tf.convert_to_tensor(v) for v in tf.nest.flatten(y0)]
    n_steps = len(starts)
    t_start, t_end = ts[0], ts[-1]
    states, stage_lists, step_t, step_dt = [], [], [], []
    for i in range(n_steps):
        t = t_start + (starts[i] - float(starts[0])) if i else t_start
        dt = t_end - t if i == n_steps - 1 else tf.constant(sizes[i], ts.dtype)
        y1, _, _, k = solver.step(f, t, y, f(t, y), dt, return_stages=True)
        if solver.dense_needs_f1:
            k = k + [f(t + dt, y1)]
        states.append(y)
        stage_lists.append(k)
        step_t.append(t)
        step_dt.append(dt)
        y = list(y1)
    outputs = [[v] for v in tf.nest.flatten(y0)]
    for m in range(1, int(ts.shape[0])):
        tm = float(ts[m])
        sign = 1.0 if float(ts[-1]) > float(ts[0]) else -1.0
        i = int(np.searchsorted(sign * np.asarray(starts), sign * tm, side="right")) - 1
        if m == int(ts.shape[0]) - 1:
            value = y  # the end of the solve
        else:
            theta = (ts[m] - step_t[i]) / step_dt[i]
            b = [sum(w * theta ** (p + 1) for p, w in enumerate(row)) for row in weights]
            value = [
                y_n + step_dt[i] * tf.add_n([b_s * k_s[c] for b_s, k_s in zip(b, stage_lists[i])])
                for c, y_n in enumerate(states[i])
            ]
        for out, v in zip(outputs, value):
            out.append(v)
    return tf.nest.pack_sequence_as(y0, [tf.stack(out) for out in outputs])


def _loss(ys, seed=3):
    """A fixed random projection of every output (each output matters)."""
    flat = tf.nest.flatten(ys)
    rng = np.random.default_rng(seed)
    return tf.add_n([tf.reduce_sum(tf.constant(rng.standard_normal(y.shape), y.dtype) * y ** 2)
                     for y in flat])


# ---------------------------------------------------------------------------------------
# Steps, accuracy, order.


@pytest.mark.parametrize("method", [
    "dopri5", "bosh3", pytest.param("tsit5", marks=pytest.mark.slow),
    pytest.param("heun_euler", marks=pytest.mark.slow)])
def test_steps_do_not_depend_on_number_of_outputs(method):
    func = linear_func(A_NP)
    y0 = _y0()
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
    dense = tfaca.solve(func, _y0(), ts, rtol=1e-6, atol=1e-8)
    landing = tfaca.solve(func, _y0(), ts, rtol=1e-6, atol=1e-8, interpolate=False)
    assert int(landing.stats.num_steps) >= 199 > int(dense.stats.num_steps)
    exact = _exact(_y0(), ts)
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
    sol = tf.function(lambda: tfaca.solve(linear_func(A_NP), _y0(), ts, method=method, rtol=tol,
                                          atol=tol / 100, max_steps=20000))()
    # Interior outputs fall inside steps (not on their ends): fewer steps than outputs
    # for the higher-order methods.
    if method in ("dopri5", "tsit5"):
        assert int(sol.stats.num_steps) < 400
    np.testing.assert_allclose(sol.ys.numpy(), _exact(_y0(), ts), rtol=0, atol=error)


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
        sol = tfaca.solve(func, _y0(), np.linspace(0.0, 5.0, n), rtol=1e-6, atol=1e-8)
        counts.append(int(sol.stats.num_fevals))
    assert counts[0] == counts[1] == counts[2], counts


# ---------------------------------------------------------------------------------------
# Exact gradients.


def _variable_problem():
    A = tf.Variable(A_NP, name="A")
    c = tf.constant([0.3, -0.2, 0.1], F64)

    def func(t, y, scale):
        return tf.linalg.matvec(A, y) * scale + c * tf.sin(t)

    return A, func


@pytest.mark.parametrize("method", ["dopri5", "bosh3", pytest.param("tsit5", marks=pytest.mark.slow),
                                    pytest.param("heun_euler", marks=pytest.mark.slow)])
@pytest.mark.slow_variants
def test_aca_equals_unrolled_steps_and_interpolants(method):
    """ACA's gradient equals backprop through the same accepted steps and interpolations,
    to 1e-10 relative in float64: for y0, args, a variable and every output time."""
    A, func = _variable_problem()
    y0 = _y0()
    scale = tf.constant(0.9, F64)
    ts = tf.constant(np.sort(np.r_[0.0, np.random.default_rng(5).uniform(0, 4.0, 30), 4.0]), F64)
    rtol = {"dopri5": 1e-6, "tsit5": 1e-6, "bosh3": 1e-4, "heun_euler": 1e-3}[method]
    atol = rtol / 100
    starts, sizes = _accepted_dense_steps(lambda t, y: func(t, y, scale), y0, 0.0, 4.0, method,
                                          rtol, atol)
    assert len(starts) > 3
    # Some steps hold several outputs, and some outputs lie strictly inside steps.
    where = np.searchsorted(starts, ts.numpy()[1:-1], side="right")
    assert len(set(where)) < len(where)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y0, scale, ts])
        ys = tfaca.odeint(func, y0, ts, args=(scale,), method=method, rtol=rtol, atol=atol)
        ref = _unrolled_dense(lambda t, y, s: func(t, y, s), y0, ts, starts, sizes, method,
                              args=(scale,))
        loss, loss_ref = _loss(ys), _loss(ref)
    np.testing.assert_allclose(ys.numpy(), ref.numpy(), rtol=1e-13, atol=1e-13)
    got = tape.gradient(loss, [y0, scale, A, ts])
    want = tape.gradient(loss_ref, [y0, scale, A, ts])
    assert_grads_close(got, want, rtol=1e-10, name=method)
    assert np.count_nonzero(got[3].numpy()) == int(ts.shape[0])


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.slow_variants
def test_aca_equals_unrolled_in_graphs(mode):
    A, func = _variable_problem()
    y0 = _y0()
    scale = tf.constant(1.1, F64)
    ts = tf.constant(np.linspace(0.0, 3.0, 41), F64)
    starts, sizes = _accepted_dense_steps(lambda t, y: func(t, y, scale), y0, 0.0, 3.0, "dopri5",
                                          1e-6, 1e-8)

    @tf.function(jit_compile=mode == "xla")
    def grads(y0, scale, ts):
        with tf.GradientTape() as tape:
            tape.watch([y0, scale, ts])
            loss = _loss(tfaca.odeint(func, y0, ts, args=(scale,), rtol=1e-6, atol=1e-8,
                                      max_steps=300))
        return tape.gradient(loss, [y0, scale, A, ts])

    with tf.GradientTape() as tape:
        tape.watch([y0, scale, ts])
        loss_ref = _loss(_unrolled_dense(func, y0, ts, starts, sizes, "dopri5", args=(scale,)))
    want = tape.gradient(loss_ref, [y0, scale, A, ts])
    assert_grads_close(grads(y0, scale, ts), want, rtol=1e-10, name=mode)


@pytest.mark.slow
def test_aca_equals_unrolled_nested_reverse_time():
    """Nested states, time running backwards."""
    M = tf.constant([[0.0, 1.0], [-1.0, -0.2]], F64)

    def func(t, y):
        return {"x": tf.linalg.matvec(M, y["x"]) + 0.1 * y["v"], "v": -0.5 * y["v"] * tf.cos(t)}

    y0 = {"x": tf.constant([1.0, 0.0], F64), "v": tf.constant([0.5, -0.3], F64)}
    ts = tf.constant(np.linspace(2.0, -1.0, 23), F64)
    starts, sizes = _accepted_dense_steps(func, y0, 2.0, -1.0, "tsit5", 1e-7, 1e-9)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y0, ts])
        loss = _loss(tfaca.odeint(func, y0, ts, method="tsit5", rtol=1e-7, atol=1e-9))
        loss_ref = _loss(_unrolled_dense(func, y0, ts, starts, sizes, "tsit5"))
    assert_grads_close(tape.gradient(loss, [y0, ts]), tape.gradient(loss_ref, [y0, ts]),
                       rtol=1e-10)


@pytest.mark.parametrize("gradient", ["naive", "adjoint"])
@pytest.mark.slow
def test_other_modes_agree_with_aca(gradient):
    A, func = _variable_problem()
    y0 = _y0()
    ts = tf.constant(np.linspace(0.0, 3.0, 25), F64)
    out = {}
    for g in ("aca", gradient):
        @tf.function
        def grads(y0, ts):
            with tf.GradientTape() as tape:
                tape.watch([y0, ts])
                loss = _loss(tfaca.odeint(func, y0, ts, args=(1.0,), rtol=1e-10, atol=1e-12,
                                          gradient=g, max_steps=5000))
            return tape.gradient(loss, [y0, A, ts])

        out[g] = grads(y0, ts)
    assert_grads_close(out[gradient], out["aca"], rtol=1e-6, name=gradient)


@pytest.mark.slow_variants
@pytest.mark.parametrize("times", ["shared", "per_sample"])
def test_naive_under_xla_equals_naive_eagerly(times):
    """Under XLA an output write that keeps nothing goes past the end of the buffer and is
    dropped; its values must take no gradient either (the scatter's gradient reads them
    with a gather that XLA clamps into the buffer: the naive gradient was silently wrong,
    g_y0 off by 8.5 in tests/test_regression.py's t6-dense-shared-naive-dopri5-xla)."""
    A, func = _variable_problem()
    y0 = _y0(batch=4)
    ts = tf.constant(_per_sample_ts() if times == "per_sample" else np.linspace(0.0, 3.0, 9),
                     F64)

    def grads(y0, ts):
        with tf.GradientTape() as tape:
            tape.watch([y0, ts])
            loss = _loss(tfaca.odeint(func, y0, ts, args=(1.0,), gradient="naive",
                                      max_steps=200))
        return tape.gradient(loss, [y0, A, ts])

    eager = grads(y0, ts)
    compiled = tf.function(grads, jit_compile=True)(y0, ts)
    assert_grads_close(compiled, eager, rtol=1e-12, name="naive under XLA")


def test_time_gradients_match_finite_differences():
    func = linear_func(A_NP)
    y0 = _y0()
    ts = np.linspace(0.0, 3.0, 9)
    solve = tf.function(
        lambda ts: _loss(tfaca.odeint(func, y0, ts, rtol=1e-11, atol=1e-13, max_steps=5000)))

    @tf.function
    def grad(ts):
        with tf.GradientTape() as tape:
            tape.watch(ts)
            loss = solve(ts)
        return tape.gradient(loss, ts)

    got = grad(tf.constant(ts)).numpy()
    eps = 1e-6
    for k in (0, 3, 8):
        up, down = ts.copy(), ts.copy()
        up[k] += eps
        down[k] -= eps
        fd = float(solve(tf.constant(up))) - float(solve(tf.constant(down)))
        np.testing.assert_allclose(got[k], fd / (2 * eps), rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_second_derivative_through_interpolation():
    """A Hessian-vector product of ACA with interpolated outputs equals that of the same
    accepted steps and interpolants unrolled."""
    func = linear_func(A_NP)
    y0 = _y0()
    ts = tf.constant(np.linspace(0.0, 3.0, 15), F64)
    starts, sizes = _accepted_dense_steps(lambda t, y: func(t, y), y0, 0.0, 3.0, "dopri5",
                                          1e-6, 1e-8)
    hvps = []
    for solve in (lambda y: tfaca.odeint(func, y, ts, rtol=1e-6, atol=1e-8),
                  lambda y: _unrolled_dense(func, y, ts, starts, sizes, "dopri5")):
        with tf.GradientTape() as outer:
            outer.watch(y0)
            with tf.GradientTape() as inner:
                inner.watch(y0)
                loss = _loss(solve(y0))
            penalty = tf.reduce_sum(inner.gradient(loss, y0) ** 2)
        hvps.append(outer.gradient(penalty, y0))
    assert_grads_close(hvps[0], hvps[1], rtol=1e-9)


# ---------------------------------------------------------------------------------------
# Times per sample.


@pytest.mark.parametrize("gradient", ["aca", "naive", "adjoint"])
@pytest.mark.slow_variants
def test_per_sample_times_match_solving_each_sample_alone(gradient):
    func = linear_func(A_NP)
    ts = _per_sample_ts()
    y0 = _y0(batch=4)
    sol = tfaca.solve(func, y0, ts, rtol=1e-10, atol=1e-12, gradient=gradient, max_steps=5000)
    assert sol.ys.shape == (6, 4, 3)
    np.testing.assert_allclose(sol.ys.numpy(), _exact(y0, ts), atol=1e-8)
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
    ts = _per_sample_ts()
    y0 = _y0(batch=4)
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
    ts = _per_sample_ts()
    y0 = _y0(batch=4)
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

    y0 = _y0(batch=4)
    for seed in (0, 1, 2):
        ts = _per_sample_ts(seed=seed)
        ys, g = run(y0, tf.constant(ts))
        np.testing.assert_allclose(ys.numpy(), _exact(y0, ts), atol=1e-6)
        eager = tfaca.odeint(func, tf.Variable(y0), ts, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(ys.numpy(), eager.numpy(), rtol=1e-12, atol=1e-12)
    assert len(traces) == 1


def test_per_sample_float32_and_nested():
    func = lambda t, y: (tf.linalg.matvec(tf.constant(A_NP, tf.float32), y[0]), -y[1])  # noqa: E731
    y0 = (_y0(batch=4, dtype=tf.float32), tf.ones([4, 2], tf.float32))
    ts = _per_sample_ts().astype(np.float32)
    ys = tfaca.odeint(func, y0, ts, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ys[0].numpy(), _exact(y0[0].numpy().astype(np.float64), ts),
                               atol=2e-5)
    np.testing.assert_allclose(ys[1].numpy(), np.exp(-ts.T)[:, :, None] * np.ones(2), rtol=2e-5)


def test_per_sample_reverse_time():
    ts = -_per_sample_ts()
    y0 = _y0(batch=4)
    ys = tfaca.odeint(linear_func(A_NP), y0, ts, rtol=1e-10, atol=1e-12, max_steps=5000)
    np.testing.assert_allclose(ys.numpy(), _exact(y0, ts), atol=1e-8)


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
    ts = _per_sample_ts(pad_row=None)
    if bad == "unequal starts":
        ts[1, 0] = 0.1
    elif bad == "not monotone":
        ts[1, [2, 3]] = ts[1, [3, 2]]
    elif bad == "padding in the middle":
        ts[1, 2] = ts[1, 1]
    else:
        ts[1, 1:] = -ts[1, 1:]
    func = linear_func(A_NP)
    y0 = _y0(batch=4)
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
        tfaca.odeint(func, _y0(batch=4), _per_sample_ts(), interpolate=False)
    with pytest.raises(ValueError, match="leading axis"):
        tfaca.odeint(func, _y0(batch=3), _per_sample_ts())
    with pytest.raises(TypeError, match="interpolate"):
        tfaca.odeint(func, _y0(), [0.0, 1.0], interpolate="yes")


# ---------------------------------------------------------------------------------------
# ODELayer with times per sample.


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
    ts = np.concatenate([_per_sample_ts(batch=4, seed=s) for s in range(8)]).astype("float32")
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
    ts = _per_sample_ts().astype("float32")
    expected = model.predict([y0, ts], verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict([y0, ts], verbose=0), expected, rtol=1e-6)
    export = str(tmp_path / "served")
    model.export(export, verbose=False)
    served = tf.saved_model.load(export)
    np.testing.assert_allclose(served.serve([y0, ts]).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["dopri5", pytest.param("heun_euler", marks=pytest.mark.slow)])
def test_backward_evaluations_are_counted(method):
    """Eagerly, ACA's backward calls `func` as often as `num_fevals_backward` says: the
    stages of each step's interpolant but the last, f(t1, y1), which is the next step's
    first; the last step's is evaluated once, at the end (here only the first steps
    have outputs inside, the last none but its end)."""
    calls = [0]

    def func(t, y):
        calls[0] += 1
        return tf.linalg.matvec(tf.constant(A_NP), y)

    y0 = _y0()
    ts = np.r_[np.linspace(0.0, 1.0, 40), 8.0]  # outputs in the first steps only
    with tf.GradientTape() as tape:
        tape.watch(y0)
        sol = tfaca.solve(func, y0, ts, method=method, rtol=1e-4, atol=1e-6)
        loss = _loss(sol.ys)
    calls[0] = 0
    tape.gradient(loss, y0)
    solver = tfaca.get_solver(method)
    steps = int(sol.stats.num_steps)
    expected = int(sol.stats.num_fevals_backward)
    assert expected == steps * (len(solver.dense_weights) - 1) + 1
    assert calls[0] == expected


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_failure_before_the_first_step_gives_nan_outputs(mode):
    """A solve that fails before accepting any step reports it, and every interpolated
    output after the start is NaN, never y0 repeated."""

    def func(t, y):
        return y * tf.constant(float("nan"), F64)

    ts = np.linspace(0.0, 1.0, 7)
    run = lambda: tfaca.solve(func, _y0(), ts, throw=False)  # noqa: E731
    if mode == "xla":
        run = tf.function(run, jit_compile=True)
    sol = run()
    assert int(sol.status) == int(tfaca.Status.NONFINITE)
    assert int(sol.stats.num_steps) == 0
    np.testing.assert_array_equal(sol.ys.numpy()[0], _y0().numpy())
    assert np.all(np.isnan(sol.ys.numpy()[1:]))

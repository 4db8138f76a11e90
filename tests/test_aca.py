"""ACA (`tfaca._gradients._aca`, `_replay`): its gradient is, by definition, the exact
derivative of the discrete map made of the accepted steps with their sizes held fixed
(the step that lands on an output time has `dt = ts[j] - t_i`; an interpolated output is
the step's interpolant). The reference (`helpers.unrolled_solve`,
`helpers.unrolled_dense`) rebuilds that map from the forward solve's recorded steps as a
plain taped TensorFlow computation, so ACA must agree with it to rounding. Also: what
ACA's forward and backward record, its second derivatives, and randomness in `func`
(refused: the replay would draw other numbers)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import (
    A_NP, ADAPTIVE, F64, GRADIENT_NAMES, LOOSE_TOL, MLP_TIMES, SHORT_TS, TANH_B, TANH_TS,
    TANH_W, Y0_NP, accepted_dense_steps, accepted_steps, assert_grads_close, assert_relative,
    f64, float64_mlp, hvp, linear_func, mlp_gradients, projection_loss, quadratic_loss,
    random_y0, tanh_field, tanh_rhs, unrolled_dense, unrolled_solve, variable_linear_problem,
)


# --------------------------------------------------------------------------------------
# ACA equals the derivative of the unrolled accepted steps
# --------------------------------------------------------------------------------------


def aca_and_reference(func, y0, ts, sources, loss_fn, *, args=(), method, tol, **kwargs):
    """ACA gradients of `loss_fn(ys)` wrt `sources`, and the unrolled reference's.

    Also checks that the recording solve, the ACA solve and the reference produce the
    same outputs (they are the same arithmetic), and returns the step sequence.
    """
    with tf.GradientTape() as tape:
        tape.watch([s for s in tf.nest.flatten(sources) if isinstance(s, tf.Tensor)])
        sol = tfaca.solve(func, y0, ts, args=args, method=method, rtol=tol, atol=tol,
                          gradient="aca", interpolate=False, **kwargs)
        loss = loss_fn(sol.ys)
    g_aca = tape.gradient(loss, sources)

    steps = accepted_steps(func, y0, ts, args=args, method=method, rtol=tol, atol=tol)
    assert steps.num_steps == int(sol.stats.num_steps)
    assert steps.num_rejected == int(sol.stats.num_rejected)
    with tf.GradientTape() as tape:
        tape.watch([s for s in tf.nest.flatten(sources) if isinstance(s, tf.Tensor)])
        ys_ref = unrolled_solve(func, y0, ts, steps, args=args, method=method)
        loss_ref = loss_fn(ys_ref)
    g_ref = tape.gradient(loss_ref, sources)

    for a, r in zip(tf.nest.flatten(sol.ys), tf.nest.flatten(ys_ref)):
        np.testing.assert_allclose(a.numpy(), r.numpy(), rtol=1e-12, atol=1e-12)
    return g_aca, g_ref, steps


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow_variants
def test_unrolled_y0(method):
    y0, ts, W, b = f64(Y0_NP), f64(TANH_TS), f64(TANH_W), f64(TANH_B)
    func = lambda t, y: tanh_rhs(t, y, W, b)  # noqa: E731
    g_aca, g_ref, steps = aca_and_reference(
        func, y0, ts, y0, quadratic_loss, method=method, tol=LOOSE_TOL[method]
    )
    # The step sequence must have rejected trials, so that skipping them is exercised.
    assert steps.num_rejected > 0
    assert steps.num_steps >= 6
    assert_grads_close(g_aca, g_ref, 1e-10, "dL/dy0")


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow_variants
def test_unrolled_args(method):
    # An integer argument first, so that the float args are not at the front.
    y0, ts, W, b = f64(Y0_NP), f64(TANH_TS), f64(TANH_W), f64(TANH_B)
    k = tf.constant(3, tf.int32)

    def func(t, y, k, W, b):
        return tf.tanh(tf.linalg.matvec(W, y)) + b * tf.cos(tf.cast(k, F64) * t)

    g_aca, g_ref, _ = aca_and_reference(
        func, y0, ts, [y0, W, b], quadratic_loss, args=(k, W, b), method=method,
        tol=LOOSE_TOL[method],
    )
    assert_grads_close(g_aca, g_ref, 1e-10, "dL/d(y0, W, b)")


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow
def test_unrolled_keras_weights(method):
    keras.utils.set_random_seed(0)
    model = float64_mlp(3)
    y0, ts = f64(Y0_NP), f64(TANH_TS)

    def func(t, y):
        return model(y[None, :])[0] + 0.1 * tf.sin(t)

    weights = list(model.trainable_variables)
    g_aca, g_ref, _ = aca_and_reference(
        func, y0, ts, weights, quadratic_loss, method=method, tol=LOOSE_TOL[method]
    )
    assert len(g_aca) == 4
    assert all(np.any(np.asarray(g) != 0) for g in g_aca)
    assert_grads_close(g_aca, g_ref, 1e-10, "dL/d(keras weights)")


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow
def test_unrolled_variable(method):
    y0, ts, W = f64(Y0_NP), f64(TANH_TS), f64(TANH_W)
    b = tf.Variable(TANH_B, dtype=F64)
    scale = tf.Variable(1.3, dtype=F64)

    def func(t, y):
        return scale * tf.tanh(tf.linalg.matvec(W, y)) + b * tf.cos(3.0 * t)

    g_aca, g_ref, _ = aca_and_reference(
        func, y0, ts, [y0, b, scale], quadratic_loss, method=method, tol=LOOSE_TOL[method]
    )
    assert_grads_close(g_aca, g_ref, 1e-10, "dL/d(y0, b, scale)")


def test_variable_passed_as_arg():
    """A tf.Variable given in `args` (not only read by `func`) gets its gradient."""
    y0, ts, W = f64(Y0_NP), f64(TANH_TS), f64(TANH_W)
    b = tf.Variable(TANH_B, dtype=F64)
    with tf.GradientTape() as tape:
        ys = tfaca.odeint(tanh_rhs, y0, ts, args=(W, b), method="bosh3", rtol=1e-4, atol=1e-4,
                          interpolate=False)
        loss = quadratic_loss(ys)
    g_var = tape.gradient(loss, b)
    b_t = tf.convert_to_tensor(b)
    _, g_ref, _ = aca_and_reference(tanh_rhs, y0, ts, b_t, quadratic_loss, args=(W, b_t), method="bosh3",
                                    tol=1e-4)
    assert_grads_close(g_var, g_ref, 1e-10, "dL/db (Variable in args)")


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow_variants
def test_unrolled_ts(method):
    y0, ts, W, b = f64(Y0_NP), f64(TANH_TS), f64(TANH_W), f64(TANH_B)
    g_aca, g_ref, _ = aca_and_reference(
        tanh_rhs, y0, ts, [ts, y0, W], quadratic_loss, args=(W, b), method=method,
        tol=LOOSE_TOL[method],
    )
    # Every output time gets a gradient (interior ones from two intervals).
    assert np.all(np.asarray(g_aca[0]) != 0)
    assert_grads_close(g_aca[0], g_ref[0], 1e-10, "dL/dts")
    assert_grads_close(g_aca[1:], g_ref[1:], 1e-10, "dL/d(y0, W)")


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow
def test_unrolled_nested_state(method):
    W, b = f64(TANH_W), f64(TANH_B)
    y0 = (f64(Y0_NP[:2]), {"z": f64(Y0_NP[2:]), "w": f64([0.2, -0.1])})
    ts = f64(TANH_TS)

    def func(t, y, W, b):
        x = tf.concat([y[0], y[1]["z"]], axis=0)
        dx = tanh_rhs(t, x, W, b)
        return (dx[:2], {"z": dx[2:], "w": -0.5 * y[1]["w"] + tf.reduce_sum(y[0]) * 0.3})

    def loss_fn(ys):
        return quadratic_loss(ys[0]) + quadratic_loss(ys[1]["z"]) + 2.0 * quadratic_loss(ys[1]["w"])

    g_aca, g_ref, _ = aca_and_reference(
        func, y0, ts, [y0, W, ts], loss_fn, args=(W, b), method=method,
        tol=LOOSE_TOL[method],
    )
    assert_grads_close(g_aca, g_ref, 1e-10, "dL/d(nested y0, W, ts)")


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow_variants
def test_unrolled_reverse_time(method):
    y0, W, b = f64(Y0_NP), f64(TANH_W), f64(TANH_B)
    ts = f64(TANH_TS[::-1])
    g_aca, g_ref, steps = aca_and_reference(
        tanh_rhs, y0, ts, [y0, W, b, ts], quadratic_loss, args=(W, b), method=method,
        tol=LOOSE_TOL[method],
    )
    assert np.all(steps.dt < 0)
    assert_grads_close(g_aca, g_ref, 1e-10, "dL/d(y0, W, b, ts) backward in time")


# --------------------------------------------------------------------------------------
# With interpolated outputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dopri5", "bosh3", pytest.param("tsit5", marks=pytest.mark.slow),
                                    pytest.param("heun_euler", marks=pytest.mark.slow)])
@pytest.mark.slow_variants
def test_aca_equals_unrolled_steps_and_interpolants(method):
    """ACA's gradient equals backprop through the same accepted steps and interpolations,
    to 1e-10 relative in float64: for y0, args, a variable and every output time."""
    A, func = variable_linear_problem()
    y0 = random_y0()
    scale = tf.constant(0.9, F64)
    ts = tf.constant(np.sort(np.r_[0.0, np.random.default_rng(5).uniform(0, 4.0, 30), 4.0]), F64)
    rtol = {"dopri5": 1e-6, "tsit5": 1e-6, "bosh3": 1e-4, "heun_euler": 1e-3}[method]
    atol = rtol / 100
    starts, sizes = accepted_dense_steps(lambda t, y: func(t, y, scale), y0, 0.0, 4.0, method,
                                          rtol, atol)
    assert len(starts) > 3
    # Some steps hold several outputs, and some outputs lie strictly inside steps.
    where = np.searchsorted(starts, ts.numpy()[1:-1], side="right")
    assert len(set(where)) < len(where)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y0, scale, ts])
        ys = tfaca.odeint(func, y0, ts, args=(scale,), method=method, rtol=rtol, atol=atol)
        ref = unrolled_dense(lambda t, y, s: func(t, y, s), y0, ts, starts, sizes, method,
                              args=(scale,))
        loss, loss_ref = projection_loss(ys), projection_loss(ref)
    np.testing.assert_allclose(ys.numpy(), ref.numpy(), rtol=1e-13, atol=1e-13)
    got = tape.gradient(loss, [y0, scale, A, ts])
    want = tape.gradient(loss_ref, [y0, scale, A, ts])
    assert_grads_close(got, want, rtol=1e-10, name=method)
    assert np.count_nonzero(got[3].numpy()) == int(ts.shape[0])


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.slow_variants
def test_aca_equals_unrolled_in_graphs(mode):
    A, func = variable_linear_problem()
    y0 = random_y0()
    scale = tf.constant(1.1, F64)
    ts = tf.constant(np.linspace(0.0, 3.0, 41), F64)
    starts, sizes = accepted_dense_steps(lambda t, y: func(t, y, scale), y0, 0.0, 3.0, "dopri5",
                                          1e-6, 1e-8)

    @tf.function(jit_compile=mode == "xla")
    def grads(y0, scale, ts):
        with tf.GradientTape() as tape:
            tape.watch([y0, scale, ts])
            loss = projection_loss(tfaca.odeint(func, y0, ts, args=(scale,), rtol=1e-6, atol=1e-8,
                                      max_steps=300))
        return tape.gradient(loss, [y0, scale, A, ts])

    with tf.GradientTape() as tape:
        tape.watch([y0, scale, ts])
        loss_ref = projection_loss(unrolled_dense(func, y0, ts, starts, sizes, "dopri5", args=(scale,)))
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
    starts, sizes = accepted_dense_steps(func, y0, 2.0, -1.0, "tsit5", 1e-7, 1e-9)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y0, ts])
        loss = projection_loss(tfaca.odeint(func, y0, ts, method="tsit5", rtol=1e-7, atol=1e-9))
        loss_ref = projection_loss(unrolled_dense(func, y0, ts, starts, sizes, "tsit5"))
    assert_grads_close(tape.gradient(loss, [y0, ts]), tape.gradient(loss_ref, [y0, ts]),
                       rtol=1e-10)


def test_time_gradients_match_finite_differences():
    func = linear_func(A_NP)
    y0 = random_y0()
    ts = np.linspace(0.0, 3.0, 9)
    solve = tf.function(
        lambda ts: projection_loss(tfaca.odeint(func, y0, ts, rtol=1e-11, atol=1e-13, max_steps=5000)))

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


@pytest.mark.parametrize("method,step_size", [("dopri5", 0.05), ("rk4", 0.05), ("bosh3", 0.05)])
@pytest.mark.parametrize("times", ["shared", "rows"])
def test_aca_per_sample_with_interpolated_outputs_equals_backprop(times, method, step_size):
    reference = mlp_gradients("naive", MLP_TIMES[times], method=method, step_size=step_size,
                           per_sample=True)
    aca = mlp_gradients("aca", MLP_TIMES[times], method=method, step_size=step_size, per_sample=True)
    assert_relative(aca, reference, 1e-10, names=GRADIENT_NAMES, floor=1.0)


# --------------------------------------------------------------------------------------
# What ACA's forward and backward record
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gradient", ["aca", "naive"])
def test_forward_not_recorded_on_outer_tape(gradient):
    """ACA's forward runs with nothing recorded: a tensor computed by `func` during the
    forward is not connected to `y0` on an outer tape (it is, under naive)."""
    y0, W, b, ts = f64(Y0_NP), f64(TANH_W), f64(TANH_B), f64(TANH_TS)
    seen = []

    def func(t, y, W, b):
        out = tanh_rhs(t, y, W, b)
        seen.append(out)
        return out

    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y0, W])
        ys = tfaca.odeint(func, y0, ts, args=(W, b), method="bosh3", rtol=1e-4, atol=1e-4,
                          gradient=gradient)
        loss = quadratic_loss(ys)
        # The forward's first evaluation (ACA then traces `func` once into a scratch
        # graph, to find what it closes over: that call comes after the forward).
        inner = tf.reduce_sum(seen[0])
    connected = tape.gradient(inner, y0) is not None
    g = tape.gradient(loss, [y0, W])
    del tape
    assert all(np.all(np.isfinite(x.numpy())) for x in g)
    if gradient == "aca":
        assert not connected, "the ACA forward solve was recorded on the outer tape"
    else:
        assert connected


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.slow_variants
def test_traced_without_tape_then_differentiated(jit_compile):
    """A function traced with no tape active keeps no checkpoints (inference: `predict`,
    a served SavedModel); differentiated later by a tape around its call, its backward
    pass solves forward again to record them: the same gradient as a function traced
    under the tape, to rounding, and the same outputs."""
    y0, W, b, ts = f64(Y0_NP), f64(TANH_W), f64(TANH_B), f64(TANH_TS)

    def make():
        @tf.function
        def run(y0, W):
            return tfaca.odeint(tanh_rhs, y0, ts, args=(W, b), method="dopri5", rtol=1e-6,
                                atol=1e-6, interpolate=False, jit_compile=jit_compile)
        return run

    first = make()
    ys_plain = first(y0, W)  # traced here, with no tape
    with tf.GradientTape() as tape:
        tape.watch([y0, W])
        ys = first(y0, W)  # the same trace
        loss = quadratic_loss(ys)
    g_later = tape.gradient(loss, [y0, W])

    second = make()
    with tf.GradientTape() as tape:
        tape.watch([y0, W])
        ys_taped = second(y0, W)  # traced under the tape
        loss = quadratic_loss(ys_taped)
    g_taped = tape.gradient(loss, [y0, W])
    np.testing.assert_allclose(ys_plain.numpy(), ys_taped.numpy(), rtol=1e-13, atol=1e-14)
    assert_grads_close(g_later, g_taped, 1e-12, "dL/d(y0, W)")
    assert float(tf.reduce_max(tf.abs(g_taped[1]))) > 0


@pytest.mark.parametrize("method", ["heun_euler", "bosh3"])
def test_backward_replays_only_accepted_steps(method):
    """Eagerly, ACA's backward calls `func` exactly `solution_stages` times per accepted step (the FSAL stage is skipped)."""
    y0, W, b, ts = f64(Y0_NP), f64(TANH_W), f64(TANH_B), f64(TANH_TS)
    calls = [0]

    def func(t, y, W, b):
        calls[0] += 1
        return tanh_rhs(t, y, W, b)

    tol = LOOSE_TOL[method]
    with tf.GradientTape() as tape:
        tape.watch([y0, W])
        sol = tfaca.solve(func, y0, ts, args=(W, b), method=method, rtol=tol, atol=tol,
                          interpolate=False)
        loss = quadratic_loss(sol.ys)
    assert int(sol.stats.num_rejected) > 0
    # One more call than evaluations: under a tape, ACA traces `func` once into a
    # scratch graph (running nothing) to find the tensors it closes over.
    assert calls[0] == int(sol.stats.num_fevals) + 1
    calls[0] = 0
    g = tape.gradient(loss, [y0, W])
    stages = tfaca.get_solver(method).tableau.solution_stages
    assert calls[0] == int(sol.stats.num_steps) * stages
    assert all(np.all(np.isfinite(x.numpy())) for x in g)


@pytest.mark.parametrize("method", ["heun_euler", "dopri5"])
@pytest.mark.slow
def test_unconnected_outputs(method):
    """Losses that use only some outputs (None cotangents for the rest)."""
    W, b = f64(TANH_W), f64(TANH_B)
    y0 = {"x": f64(Y0_NP[:2]), "z": f64(Y0_NP[2:])}
    ts = f64(TANH_TS)
    tol = LOOSE_TOL[method]

    def func(t, y, W, b):
        d = tanh_rhs(t, tf.concat([y["x"], y["z"]], 0), W, b)
        return {"x": d[:2], "z": d[2:]}

    def last_x(ys):
        return tf.reduce_sum(tf.square(ys["x"][-1]))

    def first_z(ys):  # ys[0] is y0 itself: its gradient is the identity
        return 3.0 * tf.reduce_sum(ys["z"][0])

    for loss_fn in (last_x, first_z):
        g_aca, g_ref, _ = aca_and_reference(
            func, y0, ts, [y0, W, ts], loss_fn, args=(W, b), method=method, tol=tol
        )
        assert_grads_close(g_aca, g_ref, 1e-10, f"{loss_fn.__name__}")

    # Only ys[0] used: dL/dz0 = 3, every other gradient zero.
    g = g_aca
    np.testing.assert_array_equal(g[0]["z"].numpy(), [3.0])
    np.testing.assert_array_equal(g[0]["x"].numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(g[1].numpy(), np.zeros((3, 3)))
    np.testing.assert_array_equal(g[2].numpy(), np.zeros(4))


def test_loss_independent_of_solution():
    """A gradient taken through `sol.ys` with zero cotangent everywhere is zero, not None
    or NaN, for connected sources."""
    y0, W, b, ts = f64(Y0_NP), f64(TANH_W), f64(TANH_B), f64(TANH_TS)
    with tf.GradientTape() as tape:
        tape.watch([y0, W, ts])
        ys = tfaca.odeint(tanh_rhs, y0, ts, args=(W, b), method="bosh3", rtol=1e-4, atol=1e-4,
                          interpolate=False)
        loss = 0.0 * tf.reduce_sum(ys)
    for g in tape.gradient(loss, [y0, W, ts]):
        np.testing.assert_array_equal(g.numpy(), np.zeros_like(g.numpy()))


# --------------------------------------------------------------------------------------
# Second derivatives
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compile_mode, wrt",
    [("eager", "y0"), ("eager", "W"), ("eager", "ts"), ("function", "y0"), ("xla", "W"),
     pytest.param("function", "W", marks=pytest.mark.slow), pytest.param("function", "ts", marks=pytest.mark.slow),
     pytest.param("xla", "y0", marks=pytest.mark.slow), pytest.param("xla", "ts", marks=pytest.mark.slow)],
)
@pytest.mark.slow_variants
def test_aca_hessian_vector_product_is_exact(compile_mode, wrt):
    """ACA's gradient differentiated again equals the second derivative of backprop
    through the same accepted steps (to rounding)."""
    W, y0, ts = f64(A_NP), f64(Y0_NP), f64(SHORT_TS)
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
    product = hvp
    if compile_mode != "eager":
        product = tf.function(hvp, jit_compile=compile_mode == "xla")
    assert_grads_close(product(aca, x, v), hvp(ref, x, v), rtol=1e-9, name=f"HVP in {wrt}")


def test_aca_gradient_penalty_of_keras_weights():
    """A gradient penalty (d/dθ of |dL/dy0|^2), θ Keras weights, equals the unrolled one."""
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(3, activation="tanh", dtype="float64")
    dense.build((None, 3))
    y0, ts = f64([Y0_NP, 0.5 * Y0_NP[::-1] + 0.2]), f64(SHORT_TS)
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


def test_aca_second_derivative_by_tf_gradients_raises():
    """Without a tape active while the first gradient is built, nothing recorded it:
    `tf.gradients` of it would miss the checkpoints' dependence, so it raises."""
    W, ts = f64(A_NP), f64(SHORT_TS)

    @tf.function
    def run(y0):
        loss = tf.reduce_sum(tfaca.odeint(tanh_field, y0, ts, args=(W,)) ** 2)
        (g,) = tf.gradients(loss, y0)
        return tf.gradients(tf.reduce_sum(g ** 2), y0)

    with pytest.raises(NotImplementedError, match="nested tf.GradientTape"):
        run(f64(Y0_NP))


@pytest.mark.slow
def test_second_derivative_through_interpolation():
    """A Hessian-vector product of ACA with interpolated outputs equals that of the same
    accepted steps and interpolants unrolled."""
    func = linear_func(A_NP)
    y0 = random_y0()
    ts = tf.constant(np.linspace(0.0, 3.0, 15), F64)
    starts, sizes = accepted_dense_steps(lambda t, y: func(t, y), y0, 0.0, 3.0, "dopri5",
                                          1e-6, 1e-8)
    hvps = []
    for solve in (lambda y: tfaca.odeint(func, y, ts, rtol=1e-6, atol=1e-8),
                  lambda y: unrolled_dense(func, y, ts, starts, sizes, "dopri5")):
        with tf.GradientTape() as outer:
            outer.watch(y0)
            with tf.GradientTape() as inner:
                inner.watch(y0)
                loss = projection_loss(solve(y0))
            penalty = tf.reduce_sum(inner.gradient(loss, y0) ** 2)
        hvps.append(outer.gradient(penalty, y0))
    assert_grads_close(hvps[0], hvps[1], rtol=1e-9)


# --------------------------------------------------------------------------------------
# Randomness in func
# --------------------------------------------------------------------------------------


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


def test_replay_check_follows_the_precision_func_computes_in():
    """The replay must rebuild each accepted state to sqrt(eps) relative: of the solve's
    dtype, or of float16 where `func` computes in float16 (a mixed-precision Keras model in
    a float32 solve), whose roundings XLA may fuse differently in the replay than in the
    forward loop (test_series_layers' mixed-precision models tripped the float32 check)."""
    from tfaca._gradients._base import reproduction_tolerance
    from tfaca._odeint import _flat_func

    y0 = [tf.zeros([2], tf.float32)]
    f = _flat_func(lambda t, y: tf.cast(-y, tf.float16), y0[0], (), 0, tf.float32)
    assert reproduction_tolerance(tf.float32, f) == math.sqrt(np.finfo(np.float32).eps)
    out = f(tf.constant(0.0), y0, [])
    assert out[0].dtype == tf.float32
    assert reproduction_tolerance(tf.float32, f) == math.sqrt(np.finfo(np.float16).eps)
    assert reproduction_tolerance(tf.float64, lambda t, y: y) == math.sqrt(np.finfo(np.float64).eps)

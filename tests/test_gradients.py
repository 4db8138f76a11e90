"""Gradient tests for tfaca.

ACA's gradient is, by definition, the exact derivative of the discrete map made of the
accepted steps with their sizes held fixed (the step that lands on an output time has
`dt = ts[j] - t_i`). The main reference (`helpers.unrolled_solve`) rebuilds that map from
the forward solve's recorded step sequence as a plain taped TensorFlow computation, so
ACA must agree with it to rounding error. These tests step onto every output
(`interpolate=False`); `test_dense_output.py` has the same check for interpolated outputs. Analytic solutions and finite differences
check that the discrete gradient is also the gradient of the ODE solution.
"""

import keras
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

import tfaca
from helpers import (
    ADAPTIVE, A_NP, accepted_steps, assert_grads_close, f64, frechet_expm, unrolled_solve,
)

F64 = tf.float64

# Loose tolerances per method: every method takes a handful of steps on the test
# problem and rejects at least one trial (asserted in `test_unrolled_y0`).
LOOSE_TOL = {"heun_euler": 1e-3, "bosh3": 1e-4, "dopri5": 1e-6, "tsit5": 1e-6}

_RNG = np.random.default_rng(1234)
W_NP = np.random.default_rng(0).normal(size=(3, 3)) * 2.0
B_NP = np.array([0.3, -0.2, 0.1])
Y0_NP = np.array([1.0, 0.5, -0.3])
TS_NP = np.array([0.0, 0.7, 1.5, 3.0])
# Generic cotangents for every output (ys[0] included): a linear and a quadratic term.
C_NP = _RNG.normal(size=(len(TS_NP), 3))
Q_NP = _RNG.uniform(0.5, 1.5, size=(len(TS_NP),))


def rhs(t, y, W, b):
    """A non-autonomous nonlinear field: tanh(W y) + b cos(3 t)."""
    return tf.tanh(tf.linalg.matvec(W, y)) + b * tf.cos(3.0 * t)


def loss_of(ys):
    """Weighted sum of squares plus a linear term, over all outputs."""
    ys = tf.convert_to_tensor(ys)
    n = ys.shape[0]
    c = tf.constant(C_NP[:n, : ys.shape[1]], ys.dtype)
    q = tf.constant(Q_NP[:n], ys.dtype)
    return tf.reduce_sum(c * ys) + 0.5 * tf.reduce_sum(q[:, None] * tf.square(ys))


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


# ---------------------------------------------------------------------------------------
# 1. ACA == exact derivative of the unrolled accepted-step map.


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow_variants
def test_unrolled_y0(method):
    y0, ts, W, b = f64(Y0_NP), f64(TS_NP), f64(W_NP), f64(B_NP)
    func = lambda t, y: rhs(t, y, W, b)  # noqa: E731
    g_aca, g_ref, steps = aca_and_reference(
        func, y0, ts, y0, loss_of, method=method, tol=LOOSE_TOL[method]
    )
    # The step sequence must have rejected trials, so that skipping them is exercised.
    assert steps.num_rejected > 0
    assert steps.num_steps >= 6
    assert_grads_close(g_aca, g_ref, 1e-10, "dL/dy0")


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow_variants
def test_unrolled_args(method):
    # An integer argument first, so that the float args are not at the front.
    y0, ts, W, b = f64(Y0_NP), f64(TS_NP), f64(W_NP), f64(B_NP)
    k = tf.constant(3, tf.int32)

    def func(t, y, k, W, b):
        return tf.tanh(tf.linalg.matvec(W, y)) + b * tf.cos(tf.cast(k, F64) * t)

    g_aca, g_ref, _ = aca_and_reference(
        func, y0, ts, [y0, W, b], loss_of, args=(k, W, b), method=method,
        tol=LOOSE_TOL[method],
    )
    assert_grads_close(g_aca, g_ref, 1e-10, "dL/d(y0, W, b)")


def _mlp(dim):
    model = keras.Sequential(
        [
            keras.Input((dim,), dtype="float64"),
            keras.layers.Dense(16, activation="tanh", dtype="float64"),
            keras.layers.Dense(dim, dtype="float64"),
        ]
    )
    return model


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow
def test_unrolled_keras_weights(method):
    keras.utils.set_random_seed(0)
    model = _mlp(3)
    y0, ts = f64(Y0_NP), f64(TS_NP)

    def func(t, y):
        return model(y[None, :])[0] + 0.1 * tf.sin(t)

    weights = list(model.trainable_variables)
    g_aca, g_ref, _ = aca_and_reference(
        func, y0, ts, weights, loss_of, method=method, tol=LOOSE_TOL[method]
    )
    assert len(g_aca) == 4
    assert all(np.any(np.asarray(g) != 0) for g in g_aca)
    assert_grads_close(g_aca, g_ref, 1e-10, "dL/d(keras weights)")


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow
def test_unrolled_variable(method):
    y0, ts, W = f64(Y0_NP), f64(TS_NP), f64(W_NP)
    b = tf.Variable(B_NP, dtype=F64)
    scale = tf.Variable(1.3, dtype=F64)

    def func(t, y):
        return scale * tf.tanh(tf.linalg.matvec(W, y)) + b * tf.cos(3.0 * t)

    g_aca, g_ref, _ = aca_and_reference(
        func, y0, ts, [y0, b, scale], loss_of, method=method, tol=LOOSE_TOL[method]
    )
    assert_grads_close(g_aca, g_ref, 1e-10, "dL/d(y0, b, scale)")


def test_variable_passed_as_arg():
    """A tf.Variable given in `args` (not only read by `func`) gets its gradient."""
    y0, ts, W = f64(Y0_NP), f64(TS_NP), f64(W_NP)
    b = tf.Variable(B_NP, dtype=F64)
    with tf.GradientTape() as tape:
        ys = tfaca.odeint(rhs, y0, ts, args=(W, b), method="bosh3", rtol=1e-4, atol=1e-4,
                          interpolate=False)
        loss = loss_of(ys)
    g_var = tape.gradient(loss, b)
    b_t = tf.convert_to_tensor(b)
    _, g_ref, _ = aca_and_reference(rhs, y0, ts, b_t, loss_of, args=(W, b_t), method="bosh3",
                                    tol=1e-4)
    assert_grads_close(g_var, g_ref, 1e-10, "dL/db (Variable in args)")


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow_variants
def test_unrolled_ts(method):
    y0, ts, W, b = f64(Y0_NP), f64(TS_NP), f64(W_NP), f64(B_NP)
    g_aca, g_ref, _ = aca_and_reference(
        rhs, y0, ts, [ts, y0, W], loss_of, args=(W, b), method=method,
        tol=LOOSE_TOL[method],
    )
    # Every output time gets a gradient (interior ones from two intervals).
    assert np.all(np.asarray(g_aca[0]) != 0)
    assert_grads_close(g_aca[0], g_ref[0], 1e-10, "dL/dts")
    assert_grads_close(g_aca[1:], g_ref[1:], 1e-10, "dL/d(y0, W)")


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow
def test_unrolled_nested_state(method):
    W, b = f64(W_NP), f64(B_NP)
    y0 = (f64(Y0_NP[:2]), {"z": f64(Y0_NP[2:]), "w": f64([0.2, -0.1])})
    ts = f64(TS_NP)

    def func(t, y, W, b):
        x = tf.concat([y[0], y[1]["z"]], axis=0)
        dx = rhs(t, x, W, b)
        return (dx[:2], {"z": dx[2:], "w": -0.5 * y[1]["w"] + tf.reduce_sum(y[0]) * 0.3})

    def loss_fn(ys):
        return loss_of(ys[0]) + loss_of(ys[1]["z"]) + 2.0 * loss_of(ys[1]["w"])

    g_aca, g_ref, _ = aca_and_reference(
        func, y0, ts, [y0, W, ts], loss_fn, args=(W, b), method=method,
        tol=LOOSE_TOL[method],
    )
    assert_grads_close(g_aca, g_ref, 1e-10, "dL/d(nested y0, W, ts)")


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.slow_variants
def test_unrolled_reverse_time(method):
    y0, W, b = f64(Y0_NP), f64(W_NP), f64(B_NP)
    ts = f64(TS_NP[::-1])
    g_aca, g_ref, steps = aca_and_reference(
        rhs, y0, ts, [y0, W, b, ts], loss_of, args=(W, b), method=method,
        tol=LOOSE_TOL[method],
    )
    assert np.all(steps.dt < 0)
    assert_grads_close(g_aca, g_ref, 1e-10, "dL/d(y0, W, b, ts) backward in time")


# ---------------------------------------------------------------------------------------
# 2. Analytic gradients of a linear ODE.


def _linear_analytic(t0, T):
    """L = 0.5 |y(T)|^2 with y(T) = expm(A (T - t0)) y0; returns dL/d(y0, A, t0, T)."""
    A, y0 = A_NP, Y0_NP
    tau = T - t0
    M = scipy.linalg.expm(A * tau)
    yT = M @ y0
    g_y0 = M.T @ yT
    g_A = np.zeros_like(A)
    for k in range(3):
        for l in range(3):
            E = np.zeros_like(A)
            E[k, l] = 1.0
            g_A[k, l] = yT @ frechet_expm(A * tau, tau * E) @ y0
    g_T = yT @ A @ yT
    return 0.5 * yT @ yT, g_y0, g_A, np.array([-g_T, g_T])


def _linear_grads(method, gradient, tol, t0=0.3, T=2.3):
    A, y0, ts = f64(A_NP), f64(Y0_NP), f64([t0, T])
    with tf.GradientTape() as tape:
        tape.watch([A, y0, ts])
        ys = tfaca.odeint(lambda t, y, A: tf.linalg.matvec(A, y), y0, ts, args=(A,),
                          method=method, rtol=tol, atol=tol, gradient=gradient,
                          max_steps=4000)
        loss = 0.5 * tf.reduce_sum(tf.square(ys[-1]))
    return (loss, *tape.gradient(loss, [y0, A, ts]))


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
@pytest.mark.slow_variants
def test_analytic_linear_aca(method):
    loss, g_y0, g_A, g_ts = _linear_grads(method, "aca", 1e-10)
    loss_ex, gy_ex, gA_ex, gts_ex = _linear_analytic(0.3, 2.3)
    np.testing.assert_allclose(loss.numpy(), loss_ex, rtol=1e-8)
    assert_grads_close(g_y0, gy_ex, 1e-7, "dL/dy0")
    assert_grads_close(g_A, gA_ex, 1e-7, "dL/dA")
    assert_grads_close(g_ts, gts_ex, 1e-7, "dL/dts")


def test_analytic_linear_naive_tight():
    loss, g_y0, g_A, g_ts = _linear_grads("dopri5", "naive", 1e-10)
    _, gy_ex, gA_ex, gts_ex = _linear_analytic(0.3, 2.3)
    assert_grads_close(g_y0, gy_ex, 1e-7, "naive dL/dy0")
    assert_grads_close(g_A, gA_ex, 1e-7, "naive dL/dA")
    assert_grads_close(g_ts, gts_ex, 1e-7, "naive dL/dts")


def test_analytic_linear_reverse_time():
    # Backwards from T to t0: y(t0) = expm(A (t0 - T)) y0, L = c . y(t0).
    A, y0 = f64(A_NP), f64(Y0_NP)
    c = np.array([0.5, -1.0, 2.0])
    ts = f64([2.0, 0.5])
    with tf.GradientTape() as tape:
        tape.watch([y0, ts, A])
        ys = tfaca.odeint(lambda t, y, A: tf.linalg.matvec(A, y), y0, ts, args=(A,),
                          method="dopri5", rtol=1e-10, atol=1e-10)
        loss = tf.reduce_sum(f64(c) * ys[-1])
    g_y0, g_ts, g_A = tape.gradient(loss, [y0, ts, A])
    tau = 0.5 - 2.0
    M = scipy.linalg.expm(A_NP * tau)
    y1 = M @ Y0_NP
    assert_grads_close(g_y0, M.T @ c, 1e-7, "dL/dy0")
    d = c @ A_NP @ y1  # dL/d(ts[1]); dL/d(ts[0]) = -d
    assert_grads_close(g_ts, np.array([-d, d]), 1e-7, "dL/dts")
    gA = np.array(
        [[c @ frechet_expm(A_NP * tau, tau * np.eye(3)[:, [k]] @ np.eye(3)[[l], :]) @ Y0_NP
          for l in range(3)] for k in range(3)]
    )
    assert_grads_close(g_A, gA, 1e-7, "dL/dA")


# ---------------------------------------------------------------------------------------
# 3. Finite differences on a nonlinear problem.


def test_finite_differences():
    W0, b0, y00 = f64(W_NP * 0.7), f64(B_NP), f64(Y0_NP)
    ts = f64([0.0, 1.0, 2.0])

    def loss_fn(y0, W, b):
        ys = tfaca.odeint(lambda t, y, W, b: tf.tanh(tf.linalg.matvec(W, y)) + b, y0, ts,
                          args=(W, b), method="dopri5", rtol=1e-11, atol=1e-11)
        return loss_of(ys)

    loss_f = tf.function(loss_fn)
    with tf.GradientTape() as tape:
        tape.watch([y00, W0, b0])
        loss = loss_fn(y00, W0, b0)
    g_y0, g_W, g_b = [g.numpy() for g in tape.gradient(loss, [y00, W0, b0])]

    eps = 1e-6

    def fd(which, index):
        base = [y00.numpy(), W0.numpy(), b0.numpy()]
        plus = [x.copy() for x in base]
        minus = [x.copy() for x in base]
        plus[which][index] += eps
        minus[which][index] -= eps
        return (float(loss_f(*map(f64, plus))) - float(loss_f(*map(f64, minus)))) / (2 * eps)

    checks = [(0, (i,), g_y0[i]) for i in range(3)]
    checks += [(1, (0, 0), g_W[0, 0]), (1, (1, 2), g_W[1, 2]), (1, (2, 1), g_W[2, 1])]
    checks += [(2, (1,), g_b[1])]
    scale = max(np.max(np.abs(g_y0)), np.max(np.abs(g_W)), np.max(np.abs(g_b)))
    for which, index, g in checks:
        approx = fd(which, index)
        assert abs(approx - g) <= 1e-6 * max(abs(g), 0.1 * scale), (which, index, approx, g)


# ---------------------------------------------------------------------------------------
# 4. Execution modes and precisions.


def _grads_wb(y0, ts, W, b, method="dopri5", tol=1e-6, gradient="aca"):
    with tf.GradientTape() as tape:
        tape.watch([y0, ts, W, b])
        sol = tfaca.solve(rhs, y0, ts, args=(W, b), method=method, rtol=tol, atol=tol,
                          gradient=gradient, max_steps=200)
        loss = loss_of(sol.ys)
    return [loss] + tape.gradient(loss, [y0, ts, W, b]) + [sol.stats.num_rejected]


@pytest.mark.parametrize("method", ["bosh3", "dopri5"])
@pytest.mark.slow
def test_modes_agree(method):
    """Eager, tf.function and XLA: same steps, same gradients (args, ts, a Variable)."""
    inputs = (f64(Y0_NP), f64(TS_NP), f64(W_NP), f64(B_NP))
    scale = tf.Variable(0.8, dtype=F64)
    tol = LOOSE_TOL[method]

    def run(y0, ts, W, b):
        with tf.GradientTape() as tape:
            tape.watch([y0, ts, W, b])
            sol = tfaca.solve(lambda t, y, W, b: scale * rhs(t, y, W, b), y0, ts, args=(W, b),
                              method=method, rtol=tol, atol=tol, max_steps=200)
            loss = loss_of(sol.ys)
        return [loss] + tape.gradient(loss, [y0, ts, W, b, scale]) + [sol.stats.num_rejected]

    eager = run(*inputs)
    graph = tf.function(run)(*inputs)
    xla = tf.function(run, jit_compile=True)(*inputs)
    assert int(eager[-1]) > 0
    assert int(graph[-1]) == int(eager[-1]) and int(xla[-1]) == int(eager[-1])
    assert_grads_close(graph[:-1], eager[:-1], 1e-12, "tf.function vs eager")
    assert_grads_close(xla[:-1], eager[:-1], 1e-12, "XLA vs eager")


@pytest.mark.slow
def test_float32_close_to_float64():
    g64 = tf.function(lambda *a: _grads_wb(*a, tol=1e-6))(
        f64(Y0_NP), f64(TS_NP), f64(W_NP), f64(B_NP)
    )
    c32 = lambda x: tf.constant(np.asarray(x), tf.float32)  # noqa: E731
    g32 = tf.function(lambda *a: _grads_wb(*a, tol=1e-5))(
        c32(Y0_NP), c32(TS_NP), c32(W_NP), c32(B_NP)
    )
    for a, e in zip(g32[1:5], g64[1:5]):
        assert a.dtype == tf.float32
        assert_grads_close(tf.cast(a, F64), e, 3e-4, "float32 vs float64")


@pytest.mark.slow
def test_naive_differs_from_aca_at_loose_tolerance():
    inputs = (f64(Y0_NP), f64(TS_NP), f64(W_NP), f64(B_NP))
    run = tf.function(lambda *a, gradient: _grads_wb(*a, method="heun_euler", tol=1e-3,
                                                     gradient=gradient))
    aca = run(*inputs, gradient="aca")
    naive = run(*inputs, gradient="naive")
    # Same forward...
    np.testing.assert_allclose(naive[0].numpy(), aca[0].numpy(), rtol=1e-13)
    # ...but naive also differentiates the step-size selection: a visible difference,
    # of the size of the tolerance, not a wildly different gradient.
    for a, n in zip(aca[1:5], naive[1:5]):
        a, n = a.numpy(), n.numpy()
        rel = np.max(np.abs(a - n)) / np.max(np.abs(a))
        assert 1e-6 < rel < 0.2, rel


# ---------------------------------------------------------------------------------------
# 5. What ACA's forward and backward do (and do not) record.


@pytest.mark.parametrize("gradient", ["aca", "naive"])
def test_forward_not_recorded_on_outer_tape(gradient):
    """ACA's forward runs with nothing recorded: a tensor computed by `func` during the
    forward is not connected to `y0` on an outer tape (it is, under naive)."""
    y0, W, b, ts = f64(Y0_NP), f64(W_NP), f64(B_NP), f64(TS_NP)
    seen = []

    def func(t, y, W, b):
        out = rhs(t, y, W, b)
        seen.append(out)
        return out

    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y0, W])
        ys = tfaca.odeint(func, y0, ts, args=(W, b), method="bosh3", rtol=1e-4, atol=1e-4,
                          gradient=gradient)
        loss = loss_of(ys)
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
    y0, W, b, ts = f64(Y0_NP), f64(W_NP), f64(B_NP), f64(TS_NP)

    def make():
        @tf.function
        def run(y0, W):
            return tfaca.odeint(rhs, y0, ts, args=(W, b), method="dopri5", rtol=1e-6,
                                atol=1e-6, interpolate=False, jit_compile=jit_compile)
        return run

    first = make()
    ys_plain = first(y0, W)  # traced here, with no tape
    with tf.GradientTape() as tape:
        tape.watch([y0, W])
        ys = first(y0, W)  # the same trace
        loss = loss_of(ys)
    g_later = tape.gradient(loss, [y0, W])

    second = make()
    with tf.GradientTape() as tape:
        tape.watch([y0, W])
        ys_taped = second(y0, W)  # traced under the tape
        loss = loss_of(ys_taped)
    g_taped = tape.gradient(loss, [y0, W])
    np.testing.assert_allclose(ys_plain.numpy(), ys_taped.numpy(), rtol=1e-13, atol=1e-14)
    assert_grads_close(g_later, g_taped, 1e-12, "dL/d(y0, W)")
    assert float(tf.reduce_max(tf.abs(g_taped[1]))) > 0


@pytest.mark.parametrize("method", ["heun_euler", "bosh3"])
def test_backward_replays_only_accepted_steps(method):
    """Eagerly, ACA's backward calls `func` exactly `solution_stages` times per accepted step (the FSAL stage is skipped)."""
    y0, W, b, ts = f64(Y0_NP), f64(W_NP), f64(B_NP), f64(TS_NP)
    calls = [0]

    def func(t, y, W, b):
        calls[0] += 1
        return rhs(t, y, W, b)

    tol = LOOSE_TOL[method]
    with tf.GradientTape() as tape:
        tape.watch([y0, W])
        sol = tfaca.solve(func, y0, ts, args=(W, b), method=method, rtol=tol, atol=tol,
                          interpolate=False)
        loss = loss_of(sol.ys)
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
    W, b = f64(W_NP), f64(B_NP)
    y0 = {"x": f64(Y0_NP[:2]), "z": f64(Y0_NP[2:])}
    ts = f64(TS_NP)
    tol = LOOSE_TOL[method]

    def func(t, y, W, b):
        d = rhs(t, tf.concat([y["x"], y["z"]], 0), W, b)
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
    y0, W, b, ts = f64(Y0_NP), f64(W_NP), f64(B_NP), f64(TS_NP)
    with tf.GradientTape() as tape:
        tape.watch([y0, W, ts])
        ys = tfaca.odeint(rhs, y0, ts, args=(W, b), method="bosh3", rtol=1e-4, atol=1e-4,
                          interpolate=False)
        loss = 0.0 * tf.reduce_sum(ys)
    for g in tape.gradient(loss, [y0, W, ts]):
        np.testing.assert_array_equal(g.numpy(), np.zeros_like(g.numpy()))


# ---------------------------------------------------------------------------------------
# 6. Keras in tf.function: no retracing.


def test_keras_tf_function_no_retrace():
    keras.utils.set_random_seed(1)
    model = _mlp(3)
    ts = f64([0.0, 0.5, 1.0])
    traces = [0]

    @tf.function
    def train_grads(y0):
        traces[0] += 1
        with tf.GradientTape() as tape:
            ys = tfaca.odeint(lambda t, y: model(y[None, :])[0], y0, ts, method="dopri5",
                              rtol=1e-5, atol=1e-5)
            loss = tf.reduce_sum(tf.square(ys[-1]))
        return loss, tape.gradient(loss, model.trainable_variables)

    out1 = train_grads(f64(Y0_NP))
    out2 = train_grads(f64(-Y0_NP * 0.5))
    assert traces[0] == 1
    assert all(g is not None for g in out1[1]) and all(g is not None for g in out2[1])
    assert not np.allclose(out1[1][0].numpy(), out2[1][0].numpy())
    # And the compiled gradients are the eager ones.
    with tf.GradientTape() as tape:
        ys = tfaca.odeint(lambda t, y: model(y[None, :])[0], f64(-Y0_NP * 0.5), ts,
                          method="dopri5", rtol=1e-5, atol=1e-5)
        loss = tf.reduce_sum(tf.square(ys[-1]))
    assert_grads_close(out2[1], tape.gradient(loss, model.trainable_variables), 1e-12,
                       "tf.function vs eager keras")

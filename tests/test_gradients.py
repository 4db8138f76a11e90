"""Every gradient strategy (`gradient=`): ACA, naive backprop, the continuous adjoint,
MALI and ACA with a checkpoint budget, side by side: each converges to the analytic
gradient and agrees with finite differences, each gives the same gradient eagerly, in
`tf.function` and under XLA, each sees what `func` reads (closed-over tensors,
variables, times), a solve inside a `tf.while_loop` or `tf.cond` is differentiated
right, and each counts its evaluations."""

import keras
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

import tfaca
from helpers import (
    MLP_W, MLP_Y0, A_NP, F64, LOOSE_TOL, MLP_TIMES, MODES, SHORT_TS, TANH_B, TANH_TS, TANH_W,
    Y0_NP, accepted_steps, assert_grads_close, f64, float64_mlp, frechet_expm, projection_loss,
    quadratic_loss, random_y0, strategy, tanh_field, tanh_rhs, unrolled_solve, van_der_pol,
    variable_linear_problem,
)


# --------------------------------------------------------------------------------------
# The analytic gradient
# --------------------------------------------------------------------------------------


LIN_Y0 = np.array([1.0, 0.5, -0.3])
LIN_TS = np.array([0.0, 0.7, 1.5, 3.0])
LIN_C = np.random.default_rng(7).normal(size=(len(LIN_TS), 3))


def linear_analytic():
    """L = sum_j c_j . y(t_j) + ||y(t_last)||^2 / 2 for y' = A y: dL/dy0, dL/dA, dL/dts."""
    taus = LIN_TS - LIN_TS[0]
    ys = [scipy.linalg.expm(A_NP * tau) @ LIN_Y0 for tau in taus]
    cot = [LIN_C[j].copy() for j in range(len(taus))]
    cot[-1] += ys[-1]
    g_y0 = cot[0].copy()
    g_a = np.zeros((3, 3))
    g_ts = np.zeros(len(taus))
    for j in range(1, len(taus)):
        g_y0 += scipy.linalg.expm(A_NP * taus[j]).T @ cot[j]
        g_ts[j] = cot[j] @ (A_NP @ ys[j])
        for i in range(3):
            for k in range(3):
                direction = np.zeros((3, 3))
                direction[i, k] = taus[j]
                g_a[i, k] += cot[j] @ frechet_expm(A_NP * taus[j], direction) @ LIN_Y0
    g_ts[0] = -(g_y0 - cot[0]) @ (A_NP @ LIN_Y0)
    return g_y0, g_a, g_ts


def linear_loss(ys):
    return tf.reduce_sum(tf.constant(LIN_C) * ys) + 0.5 * tf.reduce_sum(tf.square(ys[-1]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow_variants
def test_tight_tolerance_matches_analytic(mode):
    y0, a, ts = tf.constant(LIN_Y0), tf.constant(A_NP), tf.constant(LIN_TS)
    with tf.GradientTape() as tape:
        tape.watch([y0, a, ts])
        sol = tfaca.solve(lambda t, y, a: tf.linalg.matvec(a, y), y0, ts, args=(a,),
                          rtol=1e-10, atol=1e-10, gradient=strategy(mode))
        loss = linear_loss(sol.ys)
    grads = tape.gradient(loss, [y0, a, ts])
    assert int(sol.stats.num_steps) > 50  # a real adaptive solve, not a handful of steps
    assert_grads_close(grads, linear_analytic(), 1e-6, f"{mode}: dL/d(y0, A, ts)")


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


# --------------------------------------------------------------------------------------
# Finite differences
# --------------------------------------------------------------------------------------


def test_finite_differences():
    W0, b0, y00 = f64(TANH_W * 0.7), f64(TANH_B), f64(Y0_NP)
    ts = f64([0.0, 1.0, 2.0])

    def loss_fn(y0, W, b):
        ys = tfaca.odeint(lambda t, y, W, b: tf.tanh(tf.linalg.matvec(W, y)) + b, y0, ts,
                          args=(W, b), method="dopri5", rtol=1e-11, atol=1e-11)
        return quadratic_loss(ys)

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


# --------------------------------------------------------------------------------------
# The same gradient eagerly, in tf.function and under XLA, and across strategies
# --------------------------------------------------------------------------------------


NEST_TS = np.array([0.0, 0.4, 1.1, 2.0])


def nested_gradients(mode, dense, y0, k, ts):
    """A dict-of-tuple state driven by a Keras Dense layer; gradients of a loss on every
    output with respect to y0 (all leaves), an arg, ts and the layer's weights."""

    def func(t, y, k):
        q, (p, _) = y["q"], y["ps"]
        push = dense(tf.concat([q, p], -1)[None])[0]
        dp = -q - 0.1 * p + 2.0 * push * tf.cos(5.0 * t)
        return {"q": p, "ps": (dp, k * tf.reduce_sum(q * q))}

    sources = [y0, k, ts, dense.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch([y0, k, ts])
        sol = tfaca.solve(func, y0, ts, args=(k,), rtol=1e-6, atol=1e-6,
                          gradient=strategy(mode), max_steps=200)
        q, (p, s) = sol.ys["q"], sol.ys["ps"]
        weights = tf.constant([0.0, 0.5, 1.0, 2.0], F64)
        loss = tf.reduce_sum(weights[:, None] * (q + 0.5 * p * p)) + tf.reduce_sum(weights * s)
    return tape.gradient(loss, sources), sol.stats.num_steps, sol.stats.num_rejected


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
def test_execution_modes_agree(mode):
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(2, activation="tanh", dtype="float64")
    dense.build((None, 4))
    y0 = {"q": tf.constant([1.0, -0.5], F64),
          "ps": (tf.constant([0.2, 0.7], F64), tf.constant(0.0, F64))}
    k, ts = tf.constant(0.3, F64), tf.constant(NEST_TS)

    def run():
        return nested_gradients(mode, dense, y0, k, ts)

    eager, steps, rejected = run()
    assert int(steps) >= 10 and int(rejected) >= 1  # rejected trials are part of the test
    for name, fn in (("tf.function", tf.function(run)),
                     ("jit_compile", tf.function(run, jit_compile=True))):
        grads, steps_fn, _ = fn()
        assert int(steps_fn) == int(steps), name
        flat_eager, flat = tf.nest.flatten(eager), tf.nest.flatten(grads)
        assert len(flat) == len(flat_eager) == 7  # q, p, s, k, ts, kernel, bias
        assert all(np.any(np.asarray(g) != 0) for g in flat_eager)
        assert_grads_close(flat, flat_eager, 1e-10, f"{mode} {name} vs eager")


@pytest.mark.parametrize("method", ["bosh3", "dopri5"])
@pytest.mark.slow
def test_modes_agree(method):
    """Eager, tf.function and XLA: same steps, same gradients (args, ts, a Variable)."""
    inputs = (f64(Y0_NP), f64(TANH_TS), f64(TANH_W), f64(TANH_B))
    scale = tf.Variable(0.8, dtype=F64)
    tol = LOOSE_TOL[method]

    def run(y0, ts, W, b):
        with tf.GradientTape() as tape:
            tape.watch([y0, ts, W, b])
            sol = tfaca.solve(lambda t, y, W, b: scale * tanh_rhs(t, y, W, b), y0, ts, args=(W, b),
                              method=method, rtol=tol, atol=tol, max_steps=200)
            loss = quadratic_loss(sol.ys)
        return [loss] + tape.gradient(loss, [y0, ts, W, b, scale]) + [sol.stats.num_rejected]

    eager = run(*inputs)
    graph = tf.function(run)(*inputs)
    xla = tf.function(run, jit_compile=True)(*inputs)
    assert int(eager[-1]) > 0
    assert int(graph[-1]) == int(eager[-1]) and int(xla[-1]) == int(eager[-1])
    assert_grads_close(graph[:-1], eager[:-1], 1e-12, "tf.function vs eager")
    assert_grads_close(xla[:-1], eager[:-1], 1e-12, "XLA vs eager")


def _grads_wb(y0, ts, W, b, method="dopri5", tol=1e-6, gradient="aca"):
    with tf.GradientTape() as tape:
        tape.watch([y0, ts, W, b])
        sol = tfaca.solve(tanh_rhs, y0, ts, args=(W, b), method=method, rtol=tol, atol=tol,
                          gradient=gradient, max_steps=200)
        loss = quadratic_loss(sol.ys)
    return [loss] + tape.gradient(loss, [y0, ts, W, b]) + [sol.stats.num_rejected]


@pytest.mark.slow
def test_float32_close_to_float64():
    g64 = tf.function(lambda *a: _grads_wb(*a, tol=1e-6))(
        f64(Y0_NP), f64(TANH_TS), f64(TANH_W), f64(TANH_B)
    )
    c32 = lambda x: tf.constant(np.asarray(x), tf.float32)  # noqa: E731
    g32 = tf.function(lambda *a: _grads_wb(*a, tol=1e-5))(
        c32(Y0_NP), c32(TANH_TS), c32(TANH_W), c32(TANH_B)
    )
    for a, e in zip(g32[1:5], g64[1:5]):
        assert a.dtype == tf.float32
        assert_grads_close(tf.cast(a, F64), e, 3e-4, "float32 vs float64")


@pytest.mark.slow
def test_naive_differs_from_aca_at_loose_tolerance():
    inputs = (f64(Y0_NP), f64(TANH_TS), f64(TANH_W), f64(TANH_B))
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


@pytest.mark.parametrize("gradient", ["naive", "adjoint"])
@pytest.mark.slow
def test_other_modes_agree_with_aca(gradient):
    A, func = variable_linear_problem()
    y0 = random_y0()
    ts = tf.constant(np.linspace(0.0, 3.0, 25), F64)
    out = {}
    for g in ("aca", gradient):
        @tf.function
        def grads(y0, ts):
            with tf.GradientTape() as tape:
                tape.watch([y0, ts])
                loss = projection_loss(tfaca.odeint(func, y0, ts, args=(1.0,), rtol=1e-10, atol=1e-12,
                                          gradient=g, max_steps=5000))
            return tape.gradient(loss, [y0, A, ts])

        out[g] = grads(y0, ts)
    assert_grads_close(out[gradient], out["aca"], rtol=1e-6, name=gradient)


@pytest.mark.parametrize("gradient", ["mali", "budget"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.slow_variants
def test_memory_knobs_accept_the_default_outputs(gradient, per_sample):
    """`odeint(f, y0, ts, method="alf", gradient="mali")` and a checkpoint budget take
    the default `interpolate=True` with more than two times, in a `tf.function` too."""
    method = "alf" if gradient == "mali" else "dopri5"
    strategy = "mali" if gradient == "mali" else tfaca.ACAGradient(checkpoints=3)
    y0 = tf.constant(MLP_Y0)
    ts = tf.constant(MLP_TIMES["shared"], tf.float64)
    w = tf.Variable(MLP_W)

    @tf.function
    def run():
        with tf.GradientTape() as tape:
            ys = tfaca.odeint(lambda t, y: tf.tanh(y @ w), y0, ts, method=method,
                              gradient=strategy, per_sample=per_sample, rtol=1e-4)
            loss = tf.reduce_sum(ys ** 2)
        return ys, tape.gradient(loss, w)

    ys, g = run()
    assert ys.shape == (6, 3, 4)
    assert np.all(np.isfinite(ys.numpy())) and np.all(np.isfinite(g.numpy()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="dopri5", gradient="mali"), 'invertible method, method="alf"'),
        (dict(method="alf", gradient="aca"), 'gradient="mali"'),
    ],
    ids=["mali_dopri5", "aca_alf"],
)
def test_unsupported_combinations_are_refused(kwargs, match):
    kwargs = dict(kwargs)
    ts = kwargs.pop("ts", [0.0, 1.0])
    y0 = tf.Variable(tf.ones([2, 2]))
    with pytest.raises(ValueError, match=match):
        with tf.GradientTape():
            tfaca.solve(lambda t, y: -y, y0, ts, **kwargs)


# --------------------------------------------------------------------------------------
# What func reads: closed-over tensors, variables in the times
# --------------------------------------------------------------------------------------


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
    W, b, y0, ts = f64(A_NP), f64([0.2, -0.1, 0.3]), f64(Y0_NP), f64(SHORT_TS)
    func = lambda t, y, b: tanh_field(t, y, W) + b  # noqa: E731
    steps = accepted_steps(func, y0, ts, args=(b,), method="dopri5", rtol=1e-6, atol=1e-6)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([W, b])
        got = tf.reduce_sum(tfaca.odeint(func, y0, ts, args=(b,), rtol=1e-6, atol=1e-6,
                                         interpolate=False) ** 2)
        want = tf.reduce_sum(unrolled_solve(func, y0, ts, steps, args=(b,)) ** 2)
    assert_grads_close(tape.gradient(got, [W, b]), tape.gradient(want, [W, b]), rtol=1e-10)


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


# --------------------------------------------------------------------------------------
# A solve inside a tf.while_loop (tf.scan, a Keras RNN) or a tf.cond branch
# --------------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "mode, compile_mode",
    [("aca", "function"), ("adjoint", "function"), ("naive", "function"), ("aca", "xla"),
     pytest.param("adjoint", "xla", marks=pytest.mark.slow), pytest.param("naive", "xla", marks=pytest.mark.slow)],
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
    [("aca", True), ("adjoint", False), pytest.param("aca", False, marks=pytest.mark.slow),
     pytest.param("adjoint", True, marks=pytest.mark.slow)],
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
# Counters
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_backward_fevals_counters():
    y0, ts = tf.constant([2.0, 0.0], F64), tf.constant([0.0, 2.0, 4.0], F64)
    stats = {}
    for mode in MODES:
        grad = strategy(mode)
        with tf.GradientTape() as tape:
            tape.watch(y0)
            sol = tfaca.solve(van_der_pol, y0, ts, rtol=1e-6, atol=1e-6, gradient=grad,
                              interpolate=False)
            loss = tf.reduce_sum(sol.ys)
        if mode == "adjoint":  # counters exist from the start, at 0
            assert int(grad.backward_stats.num_fevals) == 0
        tape.gradient(loss, y0)
        stats[mode] = sol.stats
        if mode == "adjoint":
            assert int(grad.backward_stats.num_fevals) > 0
            assert int(grad.backward_stats.num_steps) > 0
    n = int(stats["aca"].num_steps)
    assert n > 10
    assert int(stats["aca"].num_fevals_backward) == tfaca.Dopri5.tableau.solution_stages * n
    assert int(stats["naive"].num_fevals_backward) == 0
    assert int(stats["adjoint"].num_fevals_backward) == -1
    # The forward solve is the same whatever the gradient.
    for mode in ("adjoint", "naive"):
        assert int(stats[mode].num_steps) == n
        assert int(stats[mode].num_fevals) == int(stats["aca"].num_fevals)


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

    y0 = random_y0()
    ts = np.r_[np.linspace(0.0, 1.0, 40), 8.0]  # outputs in the first steps only
    with tf.GradientTape() as tape:
        tape.watch(y0)
        sol = tfaca.solve(func, y0, ts, method=method, rtol=1e-4, atol=1e-6)
        loss = projection_loss(sol.ys)
    calls[0] = 0
    tape.gradient(loss, y0)
    solver = tfaca.get_solver(method)
    steps = int(sol.stats.num_steps)
    expected = int(sol.stats.num_fevals_backward)
    assert expected == steps * (len(solver.dense_weights) - 1) + 1
    assert calls[0] == expected


# --------------------------------------------------------------------------------------
# Keras in tf.function: no retracing
# --------------------------------------------------------------------------------------


def test_keras_tf_function_no_retrace():
    keras.utils.set_random_seed(1)
    model = float64_mlp(3)
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


def test_throw_false_with_an_integer_variable_read_by_func():
    """A trainable integer variable that `func` updates (a call counter) gets an integer
    gradient, which `throw=False`'s NaN masking leaves as it is (it raised a TypeError)."""
    counter = tf.Variable(0, dtype=tf.int64)

    def func(t, y, k):
        counter.assign_add(1)
        return -k * y

    @tf.function
    def grads(y0, k):
        with tf.GradientTape() as tape:
            tape.watch([y0, k])
            sol = tfaca.solve(func, y0, [0.0, 1.0], args=(k,), rtol=1e-8, atol=1e-10,
                              throw=False)
            loss = tf.reduce_sum(sol.ys[-1])
        return tape.gradient(loss, [y0, k])

    g_y0, g_k = grads(tf.constant([1.0], tf.float64), tf.constant(2.0, tf.float64))
    np.testing.assert_allclose(g_y0.numpy(), [np.exp(-2.0)], rtol=1e-6)
    np.testing.assert_allclose(g_k.numpy(), -np.exp(-2.0), rtol=1e-6)
    assert int(counter.numpy()) > 0

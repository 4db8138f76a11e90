"""Controlled ODEs (`solve(..., control=path)`) and neural CDEs (`cdeint`, `solve_cde`):
against SciPy and analytic solutions, every gradient mode against backprop, knots."""

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import tensorflow as tf

import tfaca
from tfaca import _loop, _outputs

from helpers import observed_series, relative_error

JUMPING = [tfaca.LinearPath, tfaca.RectilinearPath]
PATHS = [tfaca.LinearPath, tfaca.RectilinearPath, tfaca.HermitePath, tfaca.CubicPath]


def series(batch=2, n=7, channels=2, seed=0):
    return observed_series(batch, n, channels, seed, span=3.0)


def output_times(cls, t):
    """Output times inside the path's parameter, one of them on a knot."""
    if cls is tfaca.RectilinearPath:
        return tf.constant([0.0, 1.5, 4.0, 7.0, 2.0 * (len(t) - 1)], tf.float64)
    return tf.constant(np.r_[0.0, 0.5, t[3], 2.0, t[-1]])


def forced_oscillator(t, y, u):
    """A damped oscillator driven by the input's two channels."""
    x, v = y[:, 0], y[:, 1]
    return tf.stack([v, -x - 0.3 * v + u[:, 0] + 0.5 * u[:, 1] * x], axis=1)


@pytest.mark.parametrize("cls", [tfaca.LinearPath, tfaca.HermitePath, tfaca.CubicPath])
@pytest.mark.slow_variants
def test_controlled_ode_agrees_with_scipy_on_the_same_input(cls):
    t, x = series()
    path = cls(t, x)
    y0 = np.array([[1.0, 0.0], [0.0, 1.0]])
    ts = np.linspace(0.0, t[-1], 6)
    ys = tfaca.odeint(forced_oscillator, tf.constant(y0), tf.constant(ts), control=path,
                      rtol=1e-10, atol=1e-10, max_steps=5000).numpy()
    for b in range(2):
        def rhs(s, y):
            u = path.evaluate(s).numpy()[b:b + 1]
            return forced_oscillator(s, tf.constant(y[None]), tf.constant(u)).numpy()[0]
        # SciPy integrates piece by piece (its steps must not straddle a kink either).
        knots = np.unique(np.r_[t, ts])
        expected, y = [y0[b]], y0[b]
        for lo, hi in zip(knots[:-1], knots[1:]):
            y = scipy.integrate.solve_ivp(rhs, (lo, hi), y, method="DOP853", rtol=1e-12,
                                          atol=1e-12).y[:, -1]
            if np.any(np.isclose(hi, ts[1:], rtol=0, atol=0)):
                expected.append(y)
        # The smooth paths' higher derivatives jump at the knots, which steps and their
        # interpolants cross: less accurate than the tolerance there.
        tol = 2e-9 if cls is tfaca.LinearPath else 1e-7
        np.testing.assert_allclose(ys[:, b], np.array(expected), rtol=0, atol=tol)


@pytest.mark.parametrize("cls", [tfaca.LinearPath, tfaca.HermitePath, tfaca.CubicPath])
@pytest.mark.parametrize("interpolate", [True, False])
@pytest.mark.slow_variants
def test_linear_cde_with_a_scalar_path_is_the_matrix_exponential(cls, interpolate):
    # dz = A z dX with scalar X: z(t) = expm(A (X(t) - X(t0))) z0, whatever the path's shape.
    t, x = series(channels=1, n=9)
    A = np.array([[-0.2, 1.0], [-1.0, -0.3]])
    z0 = np.array([[1.0, 0.5], [0.2, -0.4]])
    path = cls(t, x)
    sol = tfaca.solve_cde(lambda s, z: tf.linalg.matvec(tf.constant(A), z)[:, :, None],
                          tf.constant(z0), path, tf.constant(t), rtol=1e-10, atol=1e-10,
                          interpolate=interpolate, max_steps=5000)
    X = np.stack([path.evaluate(s).numpy()[:, 0] for s in t], axis=0)  # [n, batch]
    exact = np.stack([[scipy.linalg.expm(A * (X[k, b] - X[0, b])) @ z0[b] for b in range(2)]
                      for k in range(len(t))])
    # A path with a kinked derivative (Hermite's, the spline's third) reads its outputs
    # by interpolation less accurately than it steps.
    tol = 2e-9 if cls is tfaca.LinearPath or not interpolate else 1e-7
    np.testing.assert_allclose(sol.ys.numpy(), exact, rtol=0, atol=tol)


def _jumped_steps(path, ts, **solve_kwargs):
    """The accepted steps `(t, dt)` of a CDE solve on `path` run by the loop as `solve`
    runs it (the knots as jumps)."""
    func = lambda t, z: tf.tanh(z)[:, :, None] * tf.ones([1, 1, path.channels], z.dtype)  # noqa: E731
    z0 = tf.constant([[0.3, -0.2], [0.1, 0.4]], tf.float64)
    field = lambda t, y: [tf.linalg.matvec(func(t, y[0]), path.derivative(t))]  # noqa: E731
    plan, jumps = _outputs.with_stops(_outputs.plan(ts, True), path.times, False)
    controller = tfaca.StepSizeController(rtol=[tf.constant(1e-6, tf.float64)],
                                          atol=[tf.constant(1e-8, tf.float64)])
    traj = _loop.integrate(tfaca.get_solver("dopri5"), controller, field, plan.stops, [z0],
                           step_size=None, first_step=None, max_steps=2000, record=True,
                           jumps=jumps, **solve_kwargs)
    assert int(traj.status) == 0
    cp = traj.checkpoints
    n = int(cp.num_steps)
    return np.asarray(cp.t)[:n, 0], np.asarray(cp.dt)[:n, 0]


@pytest.mark.parametrize("cls", JUMPING)
@pytest.mark.slow_variants
def test_steps_never_straddle_a_knot_of_a_path_whose_derivative_jumps(cls):
    t, x = series()
    path = cls(t, x)
    knots = path.times.numpy()[0]
    ts = output_times(cls, t)
    starts, sizes = _jumped_steps(path, ts)
    ends = starts + sizes
    inner = knots[(knots > float(ts[0])) & (knots < float(ts[-1]))]
    for k in inner:
        straddle = (starts < k) & (ends > k)
        assert not straddle.any(), f"a step straddles the knot {k}: {starts[straddle]}"
        # A step ends one ulp before the knot and the next starts one ulp after it.
        assert np.any(ends == np.nextafter(k, -np.inf)), k
        assert np.any(starts == np.nextafter(k, np.inf)), k


def fixed_steps_gradients(cls, mode, **kwargs):
    """Gradients of a CDE solve with respect to `z0`, the path's values and times and the
    field's weights, with fixed Dopri5 steps (the steps do not depend on the parameters,
    so backprop through the solver is ACA's reference)."""
    t, x = series()
    X, times = tf.constant(x), tf.constant(t)
    z0 = tf.constant([[1.0, 0.5], [0.2, -0.4]], tf.float64)
    channels = 3 if cls is tfaca.RectilinearPath else 2
    A = tf.Variable(np.random.default_rng(5).normal(size=(2, 2, channels)) * 0.5)
    func = lambda s, z: tf.tanh(tf.einsum("hic,bi->bhc", A, z))  # noqa: E731
    with tf.GradientTape() as tape:
        tape.watch([z0, X, times])
        ys = tfaca.cdeint(func, z0, cls(times, X), output_times(cls, t), gradient=mode,
                          step_size=0.13, **kwargs)
        loss = tf.reduce_sum(ys ** 2 * tf.constant([1.0, 2.0], tf.float64))
    return [g.numpy() for g in tape.gradient(loss, [z0, X, times, A])]


@pytest.mark.parametrize("cls", PATHS)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.slow_variants
@pytest.mark.slow  # 14-23 s: the quick suite at CI's limit (stop 44)
def test_aca_equals_backprop_through_the_same_steps(cls, per_sample):
    reference = fixed_steps_gradients(cls, "naive", per_sample=per_sample)
    for kwargs in (dict(), dict(jit_compile=True), dict(gradient=tfaca.ACAGradient(checkpoints=2))):
        mode = kwargs.pop("gradient", "aca")
        got = fixed_steps_gradients(cls, mode, per_sample=per_sample, **kwargs)
        for g, r in zip(got, reference):
            assert relative_error(g, r) < 1e-12, (kwargs, mode)


@pytest.mark.parametrize("cls", JUMPING)
@pytest.mark.slow_variants
def test_aca_equals_backprop_when_outputs_are_stepped_onto(cls):
    reference = fixed_steps_gradients(cls, "naive", interpolate=False)
    for g, r in zip(fixed_steps_gradients(cls, "aca", interpolate=False), reference):
        assert relative_error(g, r) < 1e-12


@pytest.mark.parametrize("cls", [tfaca.LinearPath, tfaca.CubicPath])
@pytest.mark.parametrize("mode", ["aca", "adjoint", "naive"])
@pytest.mark.slow
def test_adaptive_gradients_match_finite_differences(cls, mode):
    t, x = series(n=6)
    X = tf.constant(x)
    z0 = tf.constant([[1.0, 0.5], [0.2, -0.4]], tf.float64)
    W = tf.constant(np.random.default_rng(6).normal(size=(2, 2, 2)) * 0.5)
    ts = tf.constant(np.r_[0.0, 1.0, t[-1]])
    kwargs = dict(rtol=1e-10, atol=1e-10, max_steps=5000)
    if cls is tfaca.CubicPath:
        # A spline's knots are left to the error control, which underestimates the error
        # of a step across one (the third derivative jumps there): the solve moves by more
        # than its tolerance as the inputs move, and central differences see it. Stepping
        # onto the knots (the outputs), the solution is a smooth function of the inputs.
        ts = tf.constant(t)
        kwargs["interpolate"] = False

    def loss(z0, X, W):
        func = lambda s, z: tf.tanh(tf.einsum("hic,bi->bhc", W, z))  # noqa: E731
        ys = tfaca.cdeint(func, z0, cls(t, X), ts, gradient=mode, **kwargs)
        return tf.reduce_sum(ys[1:] ** 2)

    with tf.GradientTape() as tape:
        tape.watch([z0, X, W])
        out = loss(z0, X, W)
    grads = tape.gradient(out, [z0, X, W])
    # Central differences (error ~eps^2) of solves accurate to ~1e-10, whose steps move
    # with the inputs (a smooth path's knots are not stops): eps 1e-4 keeps the solves'
    # own error divided by eps, ~1e-6, below the tolerance.
    eps = 1e-4
    for which, index in ((0, (1, 0)), (1, (0, 2, 1)), (2, (1, 0, 1))):
        inputs = [z0, X, W]
        bump = np.zeros(inputs[which].shape)
        bump[index] = eps
        up = list(inputs)
        up[which] = inputs[which] + bump
        down = list(inputs)
        down[which] = inputs[which] - bump
        fd = (loss(*up) - loss(*down)) / (2 * eps)
        np.testing.assert_allclose(grads[which].numpy()[index], fd.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", PATHS)
@pytest.mark.slow
def test_per_sample_steps_and_times_equal_each_series_solved_alone(cls):
    t, x = series(batch=3)
    times = np.stack([t, np.r_[t[:5], t[4], t[4]], t * 0.9])
    x[1, 5:] = 1e3  # padding: ignored
    z0 = tf.constant([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]], tf.float64)
    channels = 3 if cls is tfaca.RectilinearPath else 2
    W = tf.constant(np.random.default_rng(6).normal(size=(2, 2, channels)) * 0.5)
    func = lambda s, z: tf.tanh(tf.einsum("hic,bi->bhc", W, z))  # noqa: E731
    if cls is tfaca.RectilinearPath:
        ts = tf.constant(np.tile(np.arange(0.0, 13.0, 3.0), (3, 1)))
    else:
        ts = tf.constant(np.stack([times[0][[0, 2, 4, 6]], times[1][[0, 2, 4, 4]],
                                   times[2][[0, 2, 4, 6]]]))
    kwargs = dict(rtol=1e-8, atol=1e-9, per_sample=True)
    with tf.GradientTape() as tape:
        tape.watch(z0)
        batched = tfaca.cdeint(func, z0, cls(times, x), ts, **kwargs)
        loss = tf.reduce_sum(batched ** 2)
    g_batched = tape.gradient(loss, z0).numpy()
    for b in range(3):
        with tf.GradientTape() as tape:
            z = z0[b:b + 1]
            tape.watch(z)
            alone = tfaca.cdeint(func, z, cls(times[b:b + 1], x[b:b + 1]), ts[b:b + 1], **kwargs)
            loss = tf.reduce_sum(alone ** 2)
        np.testing.assert_allclose(batched[:, b].numpy(), alone[:, 0].numpy(), rtol=1e-12,
                                   atol=1e-13)
        np.testing.assert_allclose(g_batched[b], tape.gradient(loss, z).numpy()[0],
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("where", ["function", "xla"])
@pytest.mark.slow_variants
@pytest.mark.slow  # 14-23 s: the quick suite at CI's limit (stop 44)
def test_controlled_solves_in_graphs_and_under_xla_match_eager(where):
    t, x = series()
    y0 = tf.constant([[1.0, 0.0], [0.0, 1.0]], tf.float64)
    ts = tf.constant(np.linspace(0.0, t[-1], 5))

    def run(values):
        with tf.GradientTape() as tape:
            tape.watch(values)
            ys = tfaca.odeint(forced_oscillator, y0, ts, control=tfaca.LinearPath(t, values),
                              rtol=1e-6, atol=1e-8)
            loss = tf.reduce_sum(ys ** 2)
        return ys, tape.gradient(loss, values)

    eager = run(tf.constant(x))
    compiled = tf.function(run, jit_compile=where == "xla")(tf.constant(x))
    for a, b in zip(compiled, eager):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)


def test_float32_control_and_state():
    t, x = series()
    ys = tfaca.odeint(forced_oscillator, tf.constant([[1.0, 0.0], [0.0, 1.0]], tf.float32),
                      tf.constant([0.0, t[-1]], tf.float32),
                      control=tfaca.HermitePath(t.astype(np.float32), x.astype(np.float32)))
    reference = tfaca.odeint(forced_oscillator, tf.constant([[1.0, 0.0], [0.0, 1.0]], tf.float64),
                             tf.constant([0.0, t[-1]]), control=tfaca.HermitePath(t, x))
    assert ys.dtype == tf.float32
    np.testing.assert_allclose(ys.numpy(), reference.numpy(), rtol=1e-3, atol=1e-4)


def test_mali_steps_across_the_knots_of_a_linear_path_and_takes_a_smooth_one():
    """MALI through a linear path's knots (each a jump of dX/dt: ALF's `v` kept before it,
    `func` evaluated afresh after it) equals backprop through the same fixed ALF steps."""
    reference = fixed_steps_gradients(tfaca.LinearPath, "naive", method="alf")
    for g, r in zip(fixed_steps_gradients(tfaca.LinearPath, "mali", method="alf"), reference):
        assert relative_error(g, r) < 1e-11
    t, x = series()
    y0 = tf.constant([[1.0, 0.0], [0.0, 1.0]], tf.float64)
    ys = tfaca.odeint(forced_oscillator, y0, [0.0, 1.0], control=tfaca.CubicPath(t, x),
                      method="alf", gradient="mali", rtol=1e-4, atol=1e-6, max_steps=20000)
    reference = tfaca.odeint(forced_oscillator, y0, [0.0, 1.0], control=tfaca.CubicPath(t, x),
                             rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ys.numpy(), reference.numpy(), atol=1e-3)


def test_bad_control_and_cde_arguments_name_what_was_received():
    t, x = series()
    y0 = tf.constant([[1.0, 0.0], [0.0, 1.0]], tf.float64)
    with pytest.raises(TypeError, match="`control` must be a path"):
        tfaca.odeint(forced_oscillator, y0, [0.0, 1.0], control=x)
    with pytest.raises(TypeError, match="`path` must be a tfaca.LinearPath"):
        tfaca.cdeint(lambda s, z: z, y0, x, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"\(batch, hidden, channels\) matrix"):
        tfaca.cdeint(lambda s, z: z, y0, tfaca.LinearPath(t, x), [0.0, 1.0])


@pytest.mark.slow  # 14-23 s: the quick suite at CI's limit (stop 44)
def test_eager_compiled_cde_solves_reuse_their_functions_across_paths():
    """Eager calls with `jit_compile=True` compile the forward loop and the replay once
    for one `func`, whatever the path's values (the wrappers `solve` makes per call around
    `func` are told to be the same function), and give what the uncompiled solve gives."""
    from tfaca import _jit

    A = tf.Variable(np.random.default_rng(1).normal(size=(2, 2, 2)) * 0.5)

    def func(s, z):
        return tf.tanh(tf.einsum("hic,bi->bhc", A, z))

    z0 = tf.constant([[1.0, 0.5], [0.2, -0.4]], tf.float64)
    for seed in (0, 1):
        t, x = series(n=5, seed=seed)
        out = []
        for jit in (True, False):
            with tf.GradientTape() as tape:
                values = tf.constant(x)
                tape.watch(values)
                ys = tfaca.cdeint(func, z0, tfaca.LinearPath(t, values), [0.0, 1.0, t[-1]],
                                  rtol=1e-5, atol=1e-7, jit_compile=jit)
                loss = tf.reduce_sum(ys ** 2)
            out.append([ys, *tape.gradient(loss, [values, A])])
        for a, b in zip(*out):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)
    token = _jit._TOKENS[id(func)]
    traces = [entry.function.experimental_get_tracing_count()
              for key, entry in _jit._REUSED.items() if key[0] is token]
    assert traces == [1, 1], traces  # the forward loop and the replay, once each



@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.slow_variants
@pytest.mark.slow  # 14-23 s: the quick suite at CI's limit (stop 44)
def test_adjoint_reverse_solve_steps_onto_a_jumping_paths_knots(per_sample):
    """The adjoint's reverse solve stops at the knots of a linear path as the forward solve
    does (its dX/dt jumps there: the reverse solve steps to just after each knot and starts
    again just before it), instead of leaving the kinks to its error control: about the
    forward's rejected trials (leaving the kinks to the error control it rejected 15-20
    times as many, 232 against 13 at this tolerance, and its gradient was 5e-5 off), and
    ACA's gradients to the tolerance. One output time is a knot."""
    t, x = series(n=10)
    X, times = tf.constant(x), tf.constant(t)
    z0 = tf.constant([[1.0, 0.5], [0.2, -0.4]], tf.float64)
    A = tf.constant(np.random.default_rng(7).normal(size=(2, 2, 2)))
    func = lambda s, z: tf.tanh(tf.einsum("hic,bi->bhc", A, z))  # noqa: E731
    ts = tf.constant([t[0], 1.0, t[4], t[-1]])

    def gradients(gradient):
        @tf.function
        def run(z0, X):
            with tf.GradientTape() as tape:
                tape.watch([z0, X])
                sol = tfaca.solve_cde(func, z0, tfaca.LinearPath(times, X), ts,
                                      gradient=gradient, rtol=1e-7, atol=1e-7,
                                      per_sample=per_sample)
                loss = tf.reduce_sum(sol.ys[1:] ** 2)
            return tape.gradient(loss, [z0, X]), tf.reduce_max(sol.stats.num_rejected)

        return run(z0, X)

    adjoint = tfaca.AdjointGradient()
    want, forward_rejected = gradients("aca")
    got, _ = gradients(adjoint)
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-5
    backward = adjoint.backward_stats
    knots = len(t) - 2  # inside the solve
    assert int(backward.num_steps) >= knots + 1
    assert int(backward.num_rejected) <= 2 * int(forward_rejected), (
        int(backward.num_rejected), int(forward_rejected))

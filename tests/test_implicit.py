"""The implicit solvers (`tfaca._implicit`): Kværnø's ESDIRK tableaus, their orders, stiff
problems against SciPy's Radau, Newton's iterations, and gradients through the implicit
steps (ACA by the implicit function theorem against backpropagation through the same
accepted steps with converged stages, and against finite differences)."""

import math

import keras
import numpy as np
import pytest
import scipy.integrate
import tensorflow as tf

import tfaca
from helpers import COMPILED_RTOL, accepted_steps, f64, relative_error, unrolled_solve

IMPLICIT = {"kvaerno3": (tfaca.Kvaerno3, 3), "kvaerno5": (tfaca.Kvaerno5, 5)}
ROBERTSON_K = (0.04, 1e4, 3e7)


def robertson(t, y, k):
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return tf.stack([-k[0] * y1 + k[1] * y2 * y3,
                     k[0] * y1 - k[1] * y2 * y3 - k[2] * y2**2,
                     k[2] * y2**2], axis=-1)


def van_der_pol(t, y, mu):
    return tf.stack([y[..., 1], mu * (1 - y[..., 0]**2) * y[..., 1] - y[..., 0]], axis=-1)


def radau(fun, jac, y0, ts):
    """SciPy's Radau at rtol 1e-10 on NumPy functions: the reference of a stiff solve."""
    sol = scipy.integrate.solve_ivp(fun, (ts[0], ts[-1]), y0, method="Radau", t_eval=ts,
                                    jac=jac, rtol=1e-10, atol=1e-14)
    assert sol.success
    return sol.y.T


def robertson_np(t, y, k=ROBERTSON_K):
    return [-k[0] * y[0] + k[1] * y[1] * y[2],
            k[0] * y[0] - k[1] * y[1] * y[2] - k[2] * y[1] ** 2, k[2] * y[1] ** 2]


def robertson_jac_np(t, y, k=ROBERTSON_K):
    return [[-k[0], k[1] * y[2], k[1] * y[1]],
            [k[0], -k[1] * y[2] - 2 * k[2] * y[1], -k[1] * y[1]],
            [0.0, 2 * k[2] * y[1], 0.0]]


@pytest.fixture(scope="module")
def robertson_reference():
    ts = np.array([0.0, 1e-3, 1e-1, 10.0, 1e3, 1e5])
    return ts, radau(robertson_np, robertson_jac_np, np.array([1.0, 0.0, 0.0]), ts)


# --------------------------------------------------------------------------------------
# Tableaus
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(IMPLICIT))
def test_kvaerno_tableaus_are_stiffly_accurate_esdirk(method):
    cls, order = IMPLICIT[method]
    solver = tfaca.get_solver(method)
    assert isinstance(solver, cls) and solver.order == order
    assert solver.error_order == order - 1 and solver.implicit and not solver.fsal
    tab = solver.tableau
    assert tab.implicit and tab.a_diagonal[0] == 0.0
    assert len(set(tab.a_diagonal[1:])) == 1
    for i, row in enumerate(tab.a_lower):
        assert math.fsum(row) + tab.a_diagonal[i + 1] == pytest.approx(tab.c[i + 1], abs=1e-12)
    # Stiffly accurate: y1 is the last stage; the embedded solution is the one before.
    assert tab.b_sol == tab.a_lower[-1] + (tab.a_diagonal[-1],)
    embedded = tuple(b - e for b, e in zip(tab.b_sol, tab.b_error))
    assert embedded[:-2] == pytest.approx(tab.a_lower[-2], abs=1e-15)
    assert embedded[-2:] == pytest.approx((tab.a_diagonal[-2], 0.0), abs=1e-15)
    # The quadrature conditions sum_i b_i c_i^(q-1) = 1/q up to the method's order (the
    # published coefficients have 10 to 16 digits).
    for q in range(1, order + 1):
        assert math.fsum(b * c**(q - 1) for b, c in zip(tab.b_sol, tab.c)) == pytest.approx(
            1 / q, abs=1e-9)


@pytest.mark.parametrize(
    "change, match",
    [(dict(a_diagonal=(0.5, 0.5)), "the first 0"),
     (dict(a_diagonal=(0.0,)), "one entry per stage"),
     (dict(a_diagonal=(0.0, 0.25)), r"\(with a_diagonal\[1\]\) must sum to c\[1\]")],
)
def test_tableau_diagonal_is_checked(change, match):
    kwargs = dict(c=(0.0, 1.0), a_lower=((0.5,),), b_sol=(0.5, 0.5), a_diagonal=(0.0, 0.5))
    assert tfaca.ButcherTableau(**kwargs).implicit
    with pytest.raises(ValueError, match=match):
        tfaca.ButcherTableau(**{**kwargs, **change})


def test_an_explicit_solver_refuses_an_implicit_tableau():
    class Trapezoid(tfaca.AbstractSolver):
        tableau = tfaca.ButcherTableau(c=(0.0, 1.0), a_lower=((0.5,),), b_sol=(0.5, 0.5),
                                       a_diagonal=(0.0, 0.5))
        order = 2

    with pytest.raises(ValueError, match="AbstractImplicitSolver"):
        Trapezoid()

    class ImplicitTrapezoid(tfaca.AbstractImplicitSolver):
        tableau = Trapezoid.tableau
        order = 2

    # A user-defined ESDIRK method: the trapezoidal rule, second order.
    errors = [abs(float(tfaca.odeint(lambda t, y: -y, f64([1.0]), f64([0.0, 1.0]),
                                     method=ImplicitTrapezoid(), step_size=h, rtol=1e-12,
                                     atol=1e-12)[-1, 0]) - math.exp(-1)) for h in (0.2, 0.1)]
    assert 3.8 < errors[0] / errors[1] < 4.2, errors


@pytest.mark.parametrize("options, match", [
    (dict(jacobian="dense"), "jacobian"), (dict(kappa=1.5), "kappa"),
    (dict(max_iterations=0), "max_iterations"), (dict(jac=3), "jac")])
def test_bad_options_name_the_argument(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tfaca.Kvaerno5(**options)


# --------------------------------------------------------------------------------------
# Orders and stiff problems
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(IMPLICIT))
def test_convergence_order_on_a_nonstiff_nonlinear_problem(method):
    """Global error of fixed steps against SciPy at 1e-13 on Van der Pol with mu = 0.5
    (non-stiff), the Newton iterations converged to rounding."""
    order = IMPLICIT[method][1]
    mu, y0, T = f64(0.5), np.array([1.5, -0.5]), 2.0
    fun = lambda t, y: [y[1], 0.5 * (1 - y[0]**2) * y[1] - y[0]]  # noqa: E731
    exact = scipy.integrate.solve_ivp(fun, (0, T), y0, method="DOP853", rtol=1e-13,
                                      atol=1e-13).y[:, -1]

    # Newton to rounding (which a fixed step of 1/4 takes more than 10 iterations to reach:
    # failing iterations fail a fixed-step solve).
    solver = IMPLICIT[method][0](max_iterations=50)

    @tf.function
    def run(h):
        return tfaca.odeint(van_der_pol, f64(y0), f64([0.0, T]), args=(mu,), method=solver,
                            step_size=h, rtol=1e-14, atol=1e-14, max_steps=1000)[-1]

    exponents = range(3, 8) if order == 3 else range(2, 6)
    hs = [2.0**-k for k in exponents]
    errors = [np.linalg.norm(run(f64(h)).numpy() - exact) for h in hs]
    assert min(errors) > 1e-12, errors
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.3, (slope, errors)


@pytest.mark.parametrize("method", list(IMPLICIT))
def test_embedded_error_estimate_order(method):
    solver = tfaca.get_solver(method).bind(
        tfaca.StepSizeController(rtol=[f64(1e-14)], atol=[f64(1e-14)]))
    func = lambda t, y: [van_der_pol(t, y[0], 0.5)]  # noqa: E731
    t0, y0 = f64(0.3), f64([1.5, -0.7])
    hs = [0.1 * 2.0**-k for k in range(4)]
    errors = []
    for h in hs:
        _, _, y_error = solver.step(func, t0, [y0], func(t0, [y0]), f64(h))
        errors.append(np.linalg.norm(y_error[0].numpy()))
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert abs(slope - solver.order) < 0.3, (slope, errors)


def test_robertson_to_1e5_against_radau_where_dopri5_fails(robertson_reference):
    ts, reference = robertson_reference
    k, y0, rtol, atol = f64(ROBERTSON_K), f64([1.0, 0.0, 0.0]), 1e-6, 1e-10

    @tf.function
    def run(method, max_steps):
        return tfaca.solve(robertson, y0, f64(ts), args=(k,), method=method, rtol=rtol,
                           atol=atol, max_steps=max_steps, throw=False)

    scale = atol + rtol * np.abs(reference)
    for method, most_steps in (("kvaerno5", 150), ("kvaerno3", 1000)):
        sol = run(method, 5000)
        assert int(sol.status) == 0
        # Global errors within the tolerance's order (the local tolerance, accumulated).
        assert np.max(np.abs(sol.ys.numpy() - reference) / scale) < 30, method
        assert int(sol.stats.num_steps) < most_steps
        # Each trial's Newton iterations are counted: at least two per implicit stage.
        trials = int(sol.stats.num_steps + sol.stats.num_rejected)
        stages = tfaca.get_solver(method).tableau.stages - 1
        assert int(sol.stats.num_fevals) >= 2 * stages * trials
    dopri5 = run("dopri5", 5000)
    assert int(dopri5.status) == int(tfaca.Status.MAX_STEPS_REACHED)
    assert float(dopri5.t_final) < 1e3  # 5,000 trials, and not a tenth of the way


def test_van_der_pol_mu_1000_against_radau():
    ts = np.linspace(0.0, 3000.0, 7)
    y0, mu = np.array([2.0, 0.0]), f64(1000.0)
    reference = radau(lambda t, y: [y[1], 1e3 * (1 - y[0]**2) * y[1] - y[0]],
                      lambda t, y: [[0.0, 1.0], [-2e3 * y[0] * y[1] - 1, 1e3 * (1 - y[0]**2)]],
                      y0, ts)
    sol = tf.function(lambda: tfaca.solve(van_der_pol, f64(y0), f64(ts), args=(mu,),
                                          method="kvaerno5", rtol=1e-6, atol=1e-9,
                                          max_steps=5000))()
    assert relative_error(sol.ys.numpy(), reference) < 1e-4
    assert int(sol.stats.num_steps) < 1500


# --------------------------------------------------------------------------------------
# Newton's iterations
# --------------------------------------------------------------------------------------


def _stiff_linear(t, y, lam):
    return -lam * (y - tf.cos(t)[..., None] if t.shape.rank else y - tf.cos(t))


def test_newton_failure_rejects_the_trial_and_shrinks_the_step():
    """With too few iterations allowed, trials fail and are rejected, the step shrinks,
    and the solve still ends where the default one does."""
    ts = f64([0.0, 2.0])

    def run(solver):
        return tf.function(lambda: tfaca.solve(
            lambda t, y: tf.stack([-1e3 * (y[0] - tf.sin(t)) ** 3 - y[0], -y[1]]),
            f64([1.0, 0.5]), ts, method=solver, rtol=1e-6, atol=1e-9, max_steps=2000))()

    default, starved = run(tfaca.Kvaerno5()), run(tfaca.Kvaerno5(max_iterations=2))
    assert int(starved.stats.num_rejected) > int(default.stats.num_rejected)
    np.testing.assert_allclose(starved.ys.numpy(), default.ys.numpy(), rtol=1e-4, atol=1e-6)


def test_user_jacobian_takes_the_same_steps(robertson_reference):
    ts, _ = robertson_reference
    k = f64(ROBERTSON_K)

    def jac(t, y):
        y1, y2, y3 = y[0], y[1], y[2]
        zero = tf.zeros_like(y1)
        return tf.stack([
            tf.stack([-k[0] + zero, k[1] * y3, k[1] * y2]),
            tf.stack([k[0] + zero, -k[1] * y3 - 2 * k[2] * y2, -k[1] * y2]),
            tf.stack([zero, 2 * k[2] * y2, zero])])

    run = tf.function(lambda method: tfaca.solve(
        robertson, f64([1.0, 0.0, 0.0]), f64(ts[:4]), args=(k,), method=method, rtol=1e-6,
        atol=1e-10))
    auto, given = run(tfaca.Kvaerno5()), run(tfaca.Kvaerno5(jac=jac))
    assert int(given.stats.num_steps) == int(auto.stats.num_steps)
    np.testing.assert_allclose(given.ys.numpy(), auto.ys.numpy(), rtol=1e-10, atol=1e-15)


def test_batch_jacobian_equals_the_full_one_for_independent_samples():
    lam = f64([[30.0], [300.0], [3000.0]])
    y0, ts = f64([[1.0, 2.0], [0.5, 0.1], [2.0, 3.0]]), f64([0.0, 0.5, 1.0])
    run = tf.function(lambda method: tfaca.solve(_stiff_linear, y0, ts, args=(lam,),
                                                 method=method, rtol=1e-7, atol=1e-9))
    full, batch = run(tfaca.Kvaerno5(jacobian="full")), run(tfaca.Kvaerno5(jacobian="batch"))
    assert int(full.stats.num_steps) == int(batch.stats.num_steps)
    np.testing.assert_allclose(batch.ys.numpy(), full.ys.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="jacobian=.full. would couple"):
        tfaca.solve(_stiff_linear, y0, ts, args=(lam,), method=tfaca.Kvaerno5(jacobian="full"),
                    per_sample=True)


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


def _rate_loss(ys):
    # Species 2 is ~1e-5 of the others: weighted to count.
    return tf.reduce_sum(ys[-1] * f64([1.0, 1e4, 0.5])) + tf.reduce_sum(ys[1] ** 2)


def vdp_jac_np(y, mu):
    return [[0.0, 1.0], [-2 * mu * y[0] * y[1] - 1, mu * (1 - y[0] ** 2)]]


# Robertson to t = 0.1 (45 steps, 25 s eagerly: the slow suite); Van der Pol with
# mu = 100 over its first 0.3 (the quick one).
SAME_STEPS = [
    pytest.param(robertson, f64(ROBERTSON_K), [1.0, 0.0, 0.0], [0.0, 1e-3, 1e-1],
                 lambda t, y: f64(robertson_jac_np(t, y.numpy())), 1e-7, 1e-12,
                 marks=pytest.mark.slow, id="robertson"),
    pytest.param(van_der_pol, f64(100.0), [2.0, 0.0], [0.0, 0.1, 0.3],
                 lambda t, y: f64(vdp_jac_np(y.numpy(), 100.0)), 1e-7, 1e-9, id="van_der_pol"),
]


@pytest.mark.parametrize("func, params, y0, ts, jac, rtol, atol", SAME_STEPS)
def test_aca_equals_backprop_through_the_same_steps_with_converged_stages(
        func, params, y0, ts, jac, rtol, atol):
    """ACA (replay by the implicit function theorem, default Newton) against a tape
    through the same accepted steps whose stages iterate to rounding (`kappa=1e-10`, 50
    iterations allowed, the analytic Jacobian): gradients for `y0` and the parameters to
    1e-8."""
    y0, ts = f64(y0), f64(ts)
    steps = accepted_steps(func, y0, ts, args=(params,), method="kvaerno5", rtol=rtol,
                           atol=atol, max_steps=2000)
    converged = tfaca.Kvaerno5(kappa=1e-10, max_iterations=50, jac=jac).bind(
        tfaca.StepSizeController(rtol=[f64(1e-13)], atol=[f64(1e-16)]))

    def loss_of(ys):
        return tf.reduce_sum(ys[-1] * tf.range(1.0, ys.shape[-1] + 1, dtype=ys.dtype)) + \
            tf.reduce_sum(ys[1] ** 2)

    @tf.function
    def aca():
        with tf.GradientTape() as tape:
            tape.watch([y0, params])
            sol = tfaca.solve(func, y0, ts, args=(params,), method="kvaerno5", rtol=rtol,
                              atol=atol, interpolate=False, max_steps=2000)
            loss = loss_of(sol.ys)
        return sol.stats.num_steps, tape.gradient(loss, [y0, params])

    with tf.GradientTape() as tape:
        tape.watch([y0, params])
        loss = loss_of(unrolled_solve(func, y0, ts, steps, args=(params,), method=converged))
    expected = tape.gradient(loss, [y0, params])
    num_steps, actual = aca()
    assert int(num_steps) == len(steps) > 3
    for a, e in zip(actual, expected):
        assert relative_error(a.numpy(), e.numpy()) < 1e-8, (a.numpy(), e.numpy())


@pytest.mark.parametrize("interpolate", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_aca_gradients_match_finite_differences(interpolate, robertson_reference):
    ts = f64(robertson_reference[0][:5])
    y0, rtol = f64([1.0, 0.0, 0.0]), 1e-9

    def loss_of(log_k, y0):
        sol = tfaca.solve(robertson, y0, ts, args=(tf.exp(log_k),), method="kvaerno5",
                          rtol=rtol, atol=1e-14, interpolate=interpolate, max_steps=3000)
        return _rate_loss(sol.ys)

    @tf.function
    def value_and_grad(log_k, y0):
        with tf.GradientTape() as tape:
            tape.watch([log_k, y0])
            loss = loss_of(log_k, y0)
        return loss, tape.gradient(loss, [log_k, y0])

    log_k = f64(np.log(ROBERTSON_K))
    _, (g_k, g_y0) = value_and_grad(log_k, y0)
    value = tf.function(loss_of)
    eps = 1e-5
    for i in range(3):
        e = np.eye(3)[i] * eps
        fd = (float(value(log_k + e, y0)) - float(value(log_k - e, y0))) / (2 * eps)
        assert abs(float(g_k[i]) - fd) <= 1e-5 * abs(fd) + 1e-9, (i, float(g_k[i]), fd)
    e = np.eye(3)[0] * 1e-6
    fd = (float(value(log_k, y0 + e)) - float(value(log_k, y0 - e))) / 2e-6
    assert abs(float(g_y0[0]) - fd) <= 1e-5 * abs(fd), (float(g_y0[0]), fd)


def test_aca_gradients_reach_the_times():
    """d y(t_k) / d t_k = f(t_k, y(t_k)): the gradients of the outputs' times, stepped onto
    and interpolated, against the field at the outputs (a stiff non-autonomous decay)."""
    lam, y0 = f64(300.0), f64([1.0, -0.5])

    @tf.function
    def run(ts, interpolate):
        with tf.GradientTape() as tape:
            tape.watch(ts)
            ys = tfaca.odeint(_stiff_linear, y0, ts, args=(lam,), method="kvaerno5",
                              rtol=1e-10, atol=1e-12, interpolate=interpolate)
            loss = tf.reduce_sum(ys[1:])
        return ys, tape.gradient(loss, ts)

    ts = f64([0.0, 0.37, 1.0])
    for interpolate, rtol in ((False, 1e-7), (True, 1e-4)):
        ys, g_ts = run(ts, interpolate)
        field = np.array([np.sum(_stiff_linear(ts[k], ys[k], lam).numpy()) for k in (1, 2)])
        np.testing.assert_allclose(g_ts.numpy()[1:], field, rtol=rtol)


def test_naive_through_newton_equals_aca_on_the_same_fixed_steps():
    lam = tf.Variable(50.0, dtype=tf.float64)
    y0, ts = f64([1.0, 2.0]), f64([0.0, 0.2, 0.4])

    def grads(gradient):
        with tf.GradientTape() as tape:
            tape.watch(y0)
            sol = tfaca.solve(lambda t, y: -lam * (y - tf.cos(t)), y0, ts, method="kvaerno5",
                              gradient=gradient, step_size=0.1, rtol=1e-12, atol=1e-12)
            loss = tf.reduce_sum(sol.ys**2)
        return tape.gradient(loss, [lam, y0])

    aca, naive = tf.function(lambda: grads("aca"))(), tf.function(lambda: grads("naive"))()
    for a, n in zip(aca, naive):
        assert relative_error(n.numpy(), a.numpy()) < 1e-10


def test_per_sample_steps_equal_each_sample_alone():
    """Per-sample steps (each sample's own Jacobian block): each sample's outputs, steps
    and gradients equal its own solved alone."""
    lam = tf.Variable([[30.0], [300.0], [3000.0]], dtype=tf.float64)
    y0, ts = f64([[1.0, 2.0], [0.5, 0.1], [2.0, 3.0]]), f64([0.0, 0.3, 0.7, 1.0])

    def run(gradient="aca", y0=y0, rows=(0, 1, 2)):
        with tf.GradientTape() as tape:
            tape.watch(y0)
            sol = tfaca.solve(_stiff_linear, y0, ts, args=(tf.gather(lam, rows),),
                              method="kvaerno5", gradient=gradient, rtol=1e-7, atol=1e-9,
                              per_sample=True)
            loss = tf.reduce_sum(sol.ys**2)
        return sol.ys, sol.stats.num_steps, [tf.convert_to_tensor(g) for g in
                                             tape.gradient(loss, [lam, y0])]

    # A plain graph (whose loops `jit_compile="auto"` compiles with XLA); under
    # `tf.function(jit_compile=True)` in the slow suite.
    ys, steps, grads = tf.function(run)()
    assert len(set(steps.numpy().tolist())) == 3  # each sample its own steps
    # Sample 2 alone takes the steps it took in the batch.
    alone = tf.function(lambda: run(y0=y0[2:], rows=[2]))()
    assert int(alone[1][0]) == int(steps[2])
    np.testing.assert_allclose(alone[0].numpy()[:, 0], ys.numpy()[:, 2], rtol=1e-13)
    np.testing.assert_allclose(alone[2][0].numpy()[2], grads[0].numpy()[2], rtol=1e-12)


@pytest.mark.slow
def test_xla_and_a_checkpoint_budget():
    """Under `tf.function(jit_compile=True)`, the plain graph's outputs, steps and
    gradients; ACA with 2 states kept (the others rebuilt by implicit steps, values only,
    then replayed), the gradient of every state kept to rounding; shared steps and per
    sample."""
    lam = tf.Variable([[30.0], [300.0], [3000.0]], dtype=tf.float64)
    y0, ts = f64([[1.0, 2.0], [0.5, 0.1], [2.0, 3.0]]), f64([0.0, 0.3, 0.7, 1.0])

    def run(gradient, per_sample):
        with tf.GradientTape() as tape:
            tape.watch(y0)
            sol = tfaca.solve(_stiff_linear, y0, ts, args=(lam,), method="kvaerno5",
                              gradient=gradient, rtol=1e-7, atol=1e-9, per_sample=per_sample)
            loss = tf.reduce_sum(sol.ys**2)
        return tape.gradient(loss, [lam, y0])

    for per_sample in (False, True):
        every = tf.function(lambda: run("aca", per_sample))()
        budget = tf.function(lambda: run(tfaca.ACAGradient(checkpoints=2), per_sample))()
        compiled = tf.function(lambda: run("aca", per_sample), jit_compile=True)()
        for g, g_b, g_x in zip(every, budget, compiled):
            assert relative_error(g_b.numpy(), g.numpy()) < 1e-12
            assert relative_error(g_x.numpy(), g.numpy()) < COMPILED_RTOL


def test_events_and_jump_ts_through_implicit_steps():
    """A stiff decay towards an input that switches off at t = 1 (`jump_ts`), stopped by
    an event where y falls through 1/2: the event time and its ACA gradient against the
    closed form, `t* = 1 + log(2 y(1)) / lam`, `y(1) = 1 - exp(-lam)`."""
    y0, ts = f64([0.0]), f64([0.0, 3.0])

    @tf.function
    def run(lam):
        with tf.GradientTape() as tape:
            tape.watch(lam)
            sol = tfaca.solve(lambda t, y, lam: -lam * (y - tf.cast(t < 1.0, y.dtype)), y0, ts,
                              args=(lam,), method="kvaerno5", rtol=1e-8, atol=1e-11,
                              jump_ts=[1.0], event=tfaca.Event(lambda t, y, lam: y[0] - 0.5,
                                                               direction=-1))
        return sol.event_t, sol.status, tape.gradient(sol.event_t, lam)

    lam = 50.0
    y1 = 1 - math.exp(-lam)
    expected_t = 1 + math.log(2 * y1) / lam
    expected_g = -math.log(2 * y1) / lam**2 + math.exp(-lam) / (lam * y1)
    event_t, status, g = run(f64(lam))
    assert int(status) == int(tfaca.Status.EVENT)
    assert abs(float(event_t) - expected_t) < 1e-8
    # The event is found on the steps' cubic Hermite interpolant, whose derivative is the
    # least accurate part (1.4e-5 relative seen at rtol 1e-8, 3e-6 at 1e-9).
    assert abs(float(g) - expected_g) < 5e-5 * abs(expected_g), (float(g), expected_g)


def test_eager_solve_equals_the_graph():
    """Eagerly, ACA's forward runs with tapes paused: the Jacobian's own tape still
    records (`_internals.recording`)."""
    lam, y0, ts = tf.Variable(200.0, dtype=tf.float64), f64([1.0, 0.5]), f64([0.0, 0.05])

    def run():
        with tf.GradientTape() as tape:
            sol = tfaca.solve(lambda t, y: -lam * (y - tf.cos(t)), y0, ts, method="kvaerno3",
                              rtol=1e-4, atol=1e-7)
            loss = tf.reduce_sum(sol.ys**2)
        return sol.ys, tape.gradient(loss, lam)

    (ys, g), (ys_g, g_g) = run(), tf.function(run)()
    np.testing.assert_allclose(ys.numpy(), ys_g.numpy(), rtol=1e-12)
    np.testing.assert_allclose(g.numpy(), g_g.numpy(), rtol=1e-10)


def test_refusals_name_what_to_use_instead():
    y0, ts = f64([1.0]), f64([0.0, 1.0])
    with pytest.raises(ValueError, match='gradient="aca"'):
        tfaca.solve(lambda t, y: -y, y0, ts, method="kvaerno5", gradient="adjoint")
    with pytest.raises(ValueError, match="invertible"):
        tfaca.solve(lambda t, y: -y, y0, ts, method="kvaerno5", gradient="mali")
    with tf.GradientTape() as outer:
        outer.watch(y0)
        with tf.GradientTape() as inner:
            inner.watch(y0)
            loss = tf.reduce_sum(tfaca.odeint(lambda t, y: -y, y0, ts, method="kvaerno3"))
        g = inner.gradient(loss, y0)
    with pytest.raises(Exception, match="implicit steps"):
        outer.gradient(g, y0)


# --------------------------------------------------------------------------------------
# Keras
# --------------------------------------------------------------------------------------


def test_ode_layer_with_kvaerno5():
    """`ODELayer(method="kvaerno5")`: outputs, gradients for its weights, and its config
    through Keras serialization (the solver's options kept)."""
    keras.utils.set_random_seed(0)
    dynamics = keras.Sequential([keras.layers.Dense(8, activation="tanh"),
                                 keras.layers.Dense(3)])
    layer = tfaca.ODELayer(dynamics, method={"name": "kvaerno5", "jacobian": "batch"},
                           rtol=1e-5, atol=1e-7)
    x = tf.random.normal([4, 3])
    with tf.GradientTape() as tape:
        y = layer(x)
        loss = tf.reduce_sum(y**2)
    grads = tape.gradient(loss, layer.trainable_weights)
    assert y.shape == (4, 3) and all(g is not None for g in grads)
    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config)
    solver = clone.solver_options.method
    assert isinstance(solver, tfaca.Kvaerno5) and solver.jacobian == "batch"
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(x).numpy(), y.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ode_layer_with_kvaerno5_fits_exports_and_serves(tmp_path):
    """Keras' default `fit` (a graph, the solver's loops compiled with XLA) lowers the loss
    of a model with a stiff-solver `ODELayer`; the model exported as a SavedModel serves
    what it predicts."""
    keras.utils.set_random_seed(1)
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    y = np.tanh(x[:, ::-1])
    dynamics = keras.Sequential([keras.layers.Dense(16, activation="tanh"),
                                 keras.layers.Dense(3)])
    model = keras.Sequential([keras.Input((3,)), tfaca.ODELayer(
        dynamics, method={"name": "kvaerno5", "jacobian": "batch"}, rtol=1e-4, atol=1e-6)])
    model.compile(keras.optimizers.Adam(0.02), "mse")
    history = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    loss = history.history["loss"]
    assert loss[-1] < loss[0]
    model.export(str(tmp_path / "served"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_allclose(served.serve(tf.constant(x[:8])).numpy(),
                               model.predict(x[:8], verbose=0), rtol=1e-4, atol=1e-5)


@keras.saving.register_keras_serializable(package="tfaca_tests")
def _decay_jacobian(t, y):
    """The Jacobian of dy/dt = -2 y in the batch layout: -2 I per sample."""
    return -2.0 * tf.eye(3, batch_shape=tf.shape(y)[:1], dtype=y.dtype)


def test_a_registered_jac_survives_the_layer_config():
    """A `jac` registered with Keras is saved in the layer's config and loaded back."""
    layer = tfaca.ODELayer(keras.layers.Dense(3, use_bias=False),
                           method=tfaca.Kvaerno5(jacobian="batch", jac=_decay_jacobian))
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    solver = clone.solver_options.method
    assert solver.jac is _decay_jacobian and solver.jacobian == "batch"


def test_a_fixed_step_whose_newton_iterations_fail_fails_the_solve():
    """A fixed step cannot shrink: unconverged stages fail the solve (non-finite) rather
    than being kept (dy/dt = -5 y^3 from 1 with one step of 1: 7.5e158 was returned)."""
    sol = tf.function(lambda: tfaca.solve(lambda t, y: -5.0 * y**3, f64([1.0]), [0.0, 1.0],
                                          method="kvaerno3", step_size=1.0, throw=False))()
    assert int(sol.status) == int(tfaca.Status.NONFINITE)
    fine = tf.function(lambda: tfaca.solve(lambda t, y: -5.0 * y**3, f64([1.0]), [0.0, 1.0],
                                           method="kvaerno3", step_size=0.05, rtol=1e-10,
                                           atol=1e-12, throw=False))()
    assert int(fine.status) == 0 and abs(float(fine.ys[-1, 0]) - 1 / math.sqrt(11)) < 1e-3

"""Step control (`_control`, the loop's use of it): the PID controller, times to step onto
(`step_ts`) and where `func` jumps (`jump_ts`), the step floor (`min_step`), the adjoint's
seminorm."""

import keras
import numpy as np
import pytest
import scipy.integrate
import tensorflow as tf

import tfaca
from helpers import F64, f64, mlp_dynamics, relative_error
from tfaca._control import StepSizeController

MU = 10.0


def van_der_pol(t, y):
    return tf.stack([y[..., 1], MU * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], axis=-1)


def _solve(controller, rtol, y0=(2.0, 0.0), **kwargs):
    return tf.function(lambda: tfaca.solve(
        van_der_pol, f64(y0), [0.0, 30.0], rtol=rtol, atol=rtol * 1e-3, controller=controller,
        max_steps=100000, **kwargs))()


@pytest.mark.parametrize("per_sample", [False, True])
def test_pid_0_1_0_takes_exactly_the_integral_controllers_steps(per_sample):
    y0 = [[2.0, 0.0], [1.0, 1.0]]
    integral = _solve(None, 1e-5, y0, per_sample=per_sample)
    pid = _solve(tfaca.PIDController(0.0, 1.0, 0.0), 1e-5, y0, per_sample=per_sample)
    for a, b in zip(integral.stats, pid.stats):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(integral.ys, pid.ys)


@pytest.mark.slow  # 9-11 s, the quick suite at CI's limit (stop 45); benchmarks/step_control.md
def test_pi_control_rejects_fewer_trials_on_a_mildly_stiff_problem():
    reference = scipy.integrate.solve_ivp(
        lambda t, y: [y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]], (0.0, 30.0), [2.0, 0.0],
        method="Radau", rtol=1e-11, atol=1e-13).y[:, -1]
    for rtol in (1e-3, 1e-5):
        integral = _solve(None, rtol)
        pi = _solve(tfaca.PIDController(0.4, 0.3, 0.0), rtol)
        assert int(pi.stats.num_rejected) < 0.75 * int(integral.stats.num_rejected), rtol
        # As accurate for the tolerance: both within 100 rtol of the reference at t = 30.
        for sol in (integral, pi):
            assert np.max(np.abs(sol.ys[-1] - reference)) < 100 * rtol


def test_the_update_reads_the_last_two_accepted_errors():
    c = StepSizeController(rtol=[1e-3], atol=[1e-6], pcoeff=0.4, icoeff=0.3, dcoeff=0.1)
    dt, order, k = f64([0.1]), 4, 5.0
    history = c.history(dt)
    np.testing.assert_array_equal(history, np.ones((2, 1)))
    # A rejected trial changes no history; an accepted one shifts it.
    history = c.remember(history, f64([2.0]), tf.constant([False]))
    np.testing.assert_array_equal(history, np.ones((2, 1)))
    history = c.remember(history, f64([0.5]), tf.constant([True]))
    history = c.remember(history, f64([0.25]), tf.constant([True]))
    np.testing.assert_array_equal(history, [[0.25], [0.5]])
    err = f64([0.8])
    b1, b2, b3 = (0.4 + 0.3 + 0.1) / k, -(0.4 + 0.2) / k, 0.1 / k
    factor = 0.9 * 0.8 ** -b1 * 0.25 ** -b2 * 0.5 ** -b3
    np.testing.assert_allclose(c.next_step(dt, err, order, history), 0.1 * max(factor, 1.0),
                               rtol=1e-14)
    # Rejected: the factor is not floored at 1.
    err = f64([3.0])
    factor = 0.9 * 3.0 ** -b1 * 0.25 ** -b2 * 0.5 ** -b3
    np.testing.assert_allclose(c.next_step(dt, err, order, history), 0.1 * factor, rtol=1e-14)


@pytest.mark.slow  # 14-23 s: the quick suite at CI's limit (stop 44)
def test_pid_gradients_replay_the_steps_taken():
    """ACA replays the accepted steps whatever chose them: its gradient equals the
    integral controller's where PID(0, 1, 0) took the same steps, and runs compiled."""
    w = tf.Variable(0.7, dtype=F64)

    @tf.function(jit_compile=True)
    def grad(controller):
        with tf.GradientTape() as tape:
            ys = tfaca.odeint(lambda t, y: -w * y + tf.sin(y), f64([1.0, 2.0]), [0.0, 2.0, 5.0],
                              controller=controller, rtol=1e-6)
            loss = tf.reduce_sum(ys ** 2)
        return tape.gradient(loss, w)

    np.testing.assert_array_equal(grad(None), grad(tfaca.PIDController(0.0, 1.0, 0.0)))
    np.testing.assert_allclose(grad(tfaca.PIDController(0.4, 0.3, 0.0)), grad(None), rtol=1e-4)


def test_bad_controllers_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="icoeff"):
        tfaca.PIDController(0.4, 0.0)
    with pytest.raises(ValueError, match="pcoeff"):
        tfaca.PIDController(float("nan"))
    with pytest.raises(TypeError, match="controller"):
        tfaca.solve(van_der_pol, f64([2.0, 0.0]), [0.0, 1.0], controller="pid")


def test_layer_keeps_its_controller_in_its_config():
    layer = tfaca.ODELayer(mlp_dynamics(), controller=tfaca.PIDController(0.4, 0.3, 0.0))
    config = layer.get_config()
    assert config["controller"] == {"pcoeff": 0.4, "icoeff": 0.3, "dcoeff": 0.0}
    revived = tfaca.ODELayer.from_config(keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)).get_config())
    assert revived.controller == {"pcoeff": 0.4, "icoeff": 0.3, "dcoeff": 0.0}
    assert revived.solver_options.controller == tfaca.PIDController(0.4, 0.3, 0.0)
    state = layer.dynamics.layers[-1].units if hasattr(layer.dynamics, "layers") else 4
    x = np.random.default_rng(0).normal(size=(4, state)).astype("float32")
    assert np.all(np.isfinite(layer(x)))


# A decay driven by a switch: dy/dt = -k y + a u(t), u = 1 before TAU and 0 from it on
# (per sample, its own TAU). Exact: y = a/k + (y0 - a/k) e^(-k t) up to TAU, then decays.
TAU = 1.0


def switched(tau):
    def func(t, y, k, a):
        u = tf.cast(t < tau, y.dtype)
        return -k * y + a * (u if u.shape.rank == 0 else u[:, None])
    return func


def switched_exact(y0, k, a, tau, t):
    y0, t = np.asarray(y0, np.float64), np.asarray(t, np.float64)
    before = a / k + (y0 - a / k) * np.exp(-k * np.minimum(t, tau))
    return before * np.exp(-k * np.maximum(t - tau, 0.0))


SWITCH_TS = [0.0, 0.5, TAU, 1.5, 3.0]


def _switched_solve(y0=0.5, k=1.3, a=2.0, tau=TAU, ts=SWITCH_TS, **kwargs):
    kwargs.setdefault("rtol", 1e-7)
    kwargs.setdefault("atol", 1e-9)
    return tfaca.solve(switched(tau), f64([y0]), ts, args=(f64(k), f64(a)), **kwargs)


def test_jump_ts_at_a_switch_take_fewer_trials_and_reach_a_smaller_error():
    exact = switched_exact(0.5, 1.3, 2.0, TAU, SWITCH_TS)
    plain = _switched_solve()
    jumped = _switched_solve(jump_ts=[TAU])
    trials = lambda sol: int(sol.stats.num_steps) + int(sol.stats.num_rejected)  # noqa: E731
    error = lambda sol: np.max(np.abs(sol.ys.numpy()[:, 0] - exact))  # noqa: E731
    assert trials(jumped) < 0.5 * trials(plain), (trials(jumped), trials(plain))
    assert int(jumped.stats.num_rejected) <= 2 < int(plain.stats.num_rejected)
    assert error(jumped) < 0.1 * error(plain) and error(jumped) < 1e-6, (error(jumped), error(plain))
    # The output at the jump is the left limit (from the step before it), as u is at TAU.
    np.testing.assert_allclose(jumped.ys[2, 0], exact[2], rtol=1e-6)


def test_per_sample_jump_ts_equal_each_sample_solved_alone():
    taus, y0 = np.array([0.7, 1.9]), np.array([[0.5], [-0.3]])
    per_tau = lambda t, y, k, a: -k * y + a * tf.cast(t < taus, y.dtype)[:, None]  # noqa: E731
    ts = [0.0, 1.0, 2.5]
    batch = tfaca.solve(per_tau, y0, ts, args=(f64(1.3), f64(2.0)), per_sample=True,
                        jump_ts=taus[:, None], rtol=1e-7, atol=1e-9)
    for b, tau in enumerate(taus):
        alone = _switched_solve(y0[b, 0], tau=tau, ts=ts, jump_ts=[tau])
        np.testing.assert_allclose(batch.ys[:, b], alone.ys, rtol=1e-13, atol=1e-15)
        assert int(batch.stats.num_steps[b]) == int(alone.stats.num_steps)
        np.testing.assert_allclose(batch.ys[:, b, 0], switched_exact(y0[b, 0], 1.3, 2.0, tau, ts),
                                   rtol=1e-6)
    # MALI through each sample's own jumps (ALF's v kept per sample): backprop's gradient.
    grads = []
    for mode in ("mali", "naive"):
        k = f64(1.3)
        with tf.GradientTape() as tape:
            tape.watch(k)
            ys = tfaca.odeint(per_tau, y0, ts, args=(k, f64(2.0)), per_sample=True,
                              jump_ts=taus[:, None], method="alf", step_size=0.1, gradient=mode)
            loss = tf.reduce_sum(ys ** 2 * f64([1.0, 2.0, 3.0])[:, None, None])
        grads.append(float(tape.gradient(loss, k)))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-12)
    # Shared steps step onto every sample's jumps: the same outputs, to the tolerance.
    shared = tfaca.solve(per_tau, y0, ts, args=(f64(1.3), f64(2.0)), jump_ts=taus[:, None],
                         rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(shared.ys, batch.ys, rtol=1e-6)
    assert int(shared.stats.num_rejected) <= 2


def _switched_gradients(mode, **kwargs):
    y0, k, a = f64([0.5]), f64(1.3), f64(2.0)
    with tf.GradientTape() as tape:
        tape.watch([y0, k, a])
        ys = tfaca.solve(switched(TAU), y0, SWITCH_TS, args=(k, a), gradient=mode,
                         jump_ts=[TAU], **kwargs).ys
        loss = tf.reduce_sum(ys[1:, 0] * f64([1.0, -2.0, 0.5, 3.0]))
    return tf.stack([tf.reduce_sum(g) for g in tape.gradient(loss, [y0, k, a])])


def _switched_loss_exact(y0, k, a):
    return np.dot(switched_exact(y0, k, a, TAU, SWITCH_TS[1:]), [1.0, -2.0, 0.5, 3.0])


def test_gradients_across_jumps_in_every_mode():
    """ACA (RK4) and MALI (ALF) equal backprop through the same fixed steps to rounding;
    every mode, adaptive, matches the exact solution's derivatives (central differences
    of the closed form) to the tolerance."""
    for method, mode in (("rk4", "aca"), ("alf", "mali")):
        fixed = dict(method=method, step_size=0.1)
        np.testing.assert_allclose(_switched_gradients(mode, **fixed),
                                   _switched_gradients("naive", **fixed), rtol=1e-12)
    point, h = np.array([0.5, 1.3, 2.0]), 1e-6
    exact = [(_switched_loss_exact(*(point + h * e)) - _switched_loss_exact(*(point - h * e)))
             / (2 * h) for e in np.eye(3)]
    for mode in ("aca", "naive", "adjoint", tfaca.ACAGradient(checkpoints=2)):
        got = _switched_gradients(mode, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(got, exact, rtol=1e-5, err_msg=str(mode))
    # MALI's second-order ALF steps, adaptive: in a graph (eagerly, ~10^3 steps cost
    # minutes), to its looser tolerance.
    mali = tf.function(lambda: _switched_gradients("mali", method="alf", rtol=1e-5, atol=1e-7,
                                                   max_steps=20000))
    np.testing.assert_allclose(mali(), exact, rtol=1e-3)


@pytest.mark.parametrize("per_sample", [False, True])
def test_step_ts_are_stepped_onto_exactly(per_sample):
    """A solver without first-same-as-last evaluates `func` at each accepted step's end:
    every step time is among the times `func` saw (the outputs stay interpolated)."""
    seen = []

    def func(t, y):
        seen.append(np.atleast_1d(t.numpy()).copy())
        return tf.stack([y[..., 1], -y[..., 0]], axis=-1)

    step_ts = np.array([[0.3, 0.7, 1.37], [0.2, 2.5, 3.0]])
    y0 = f64([[1.0, 0.0], [0.5, 0.5]])
    sol = tfaca.solve(func, y0, [0.0, 1.0, 2.0], method="heun_euler", per_sample=per_sample,
                      step_ts=step_ts if per_sample else step_ts[0], rtol=1e-4)
    seen = np.stack(seen)  # [calls, 1 or batch]
    rows = step_ts if per_sample else step_ts[:1]
    for b, row in enumerate(rows):
        for t in row[row < 2.0]:  # 2.5 and 3.0 lie past the end: ignored
            assert np.any(seen[:, b] == t), (b, t)
    assert not np.any(seen >= 2.0 + 1e-12)
    exact = np.stack([np.cos([0.0, 1.0, 2.0]), -np.sin([0.0, 1.0, 2.0])], -1)
    np.testing.assert_allclose(sol.ys[:, 0], exact, atol=1e-3)


def test_min_step_fails_naming_the_time_or_forces_and_counts():
    """The switch without `jump_ts` at a tight tolerance: the error control needs steps
    far below `min_step` at TAU. Without force the solve fails there; with it, the steps
    across are forced, counted, and the outputs stay within what the floor allows."""
    tight = dict(rtol=1e-10, atol=1e-12, min_step=1e-3)
    with pytest.raises(tfaca.SolveError, match=r"DT_UNDERFLOW.*t=0\.99[0-9]*.*min_step=0\.001"):
        _switched_solve(**tight)
    sol = _switched_solve(**tight, throw=False)
    assert tfaca.Status.name_of(sol.status) == "DT_UNDERFLOW"
    assert 0.99 < float(sol.t_final) < TAU and int(sol.stats.num_forced) == 0
    forced = _switched_solve(**tight, force_min_step=True)
    assert tfaca.Status.name_of(forced.status) == "SUCCESS"
    assert 1 <= int(forced.stats.num_forced) <= 3
    exact = switched_exact(0.5, 1.3, 2.0, TAU, SWITCH_TS)
    assert np.max(np.abs(forced.ys.numpy()[:, 0] - exact)) < 2.0 * 1e-3
    # The floor bounds every step from below, also where the control would allow less.
    assert int(forced.stats.num_steps) < 3.0 / 1e-3 + 10
    # Per sample: only the sample that needs the floor fails.
    y0 = f64([[0.5], [0.5]])
    func = lambda t, y, k, a: -k * y + a * tf.cast(t < [TAU, 5.0], y.dtype)[:, None]  # noqa: E731
    per = tfaca.solve(func, y0, SWITCH_TS, args=(f64(1.3), f64(2.0)), per_sample=True,
                      throw=False, **tight)
    assert tfaca.Status.name_of(per.status) == ["DT_UNDERFLOW", "SUCCESS"]


def test_step_control_options_compiled_match_eager():
    """`step_ts`, `jump_ts` and a forced floor together under XLA, with ACA's gradient: as
    eagerly (the plain graph, Keras' default mode, in the layer test below)."""
    kwargs = dict(step_ts=[0.25, 2.0], jump_ts=[TAU], min_step=1e-2, force_min_step=True,
                  rtol=1e-8, atol=1e-10)

    def run():
        k = f64(1.3)
        with tf.GradientTape() as tape:
            tape.watch(k)
            sol = tfaca.solve(switched(TAU), f64([0.5]), SWITCH_TS, args=(k, f64(2.0)), **kwargs)
            loss = tf.reduce_sum(sol.ys ** 2)
        return sol.ys, sol.stats.num_steps, tape.gradient(loss, k)

    eager, compiled = run(), tf.function(run, jit_compile=True)()
    np.testing.assert_allclose(compiled[0], eager[0], rtol=1e-12)
    assert int(compiled[1]) == int(eager[1])
    np.testing.assert_allclose(compiled[2], eager[2], rtol=1e-10)
    # MALI across a jump under XLA (its kept states sized statically there).
    fixed = dict(method="alf", step_size=0.1)
    mali = tf.function(lambda: _switched_gradients("mali", **fixed), jit_compile=True)
    np.testing.assert_allclose(mali(), _switched_gradients("naive", **fixed), rtol=1e-12)


def _mlp_gradient(gradient, per_sample=False, batch=1, rtol=1e-6):
    """The MLP field's weight gradients (and the adjoint's reverse evaluations)."""
    rng = np.random.default_rng(0)
    w1 = tf.Variable(rng.normal(size=(4, 32)) * 0.6)
    w2 = tf.Variable(rng.normal(size=(32, 4)) * 0.6 / np.sqrt(2.0))
    y0 = tf.constant(rng.normal(size=(batch, 4)))
    func = lambda t, y: tf.tanh(y @ w1) @ w2  # noqa: E731
    with tf.GradientTape() as tape:
        ys = tfaca.odeint(func, y0, [0.0, 5.0], gradient=gradient, rtol=rtol, atol=rtol * 1e-2,
                          per_sample=per_sample)
        loss = tf.reduce_sum(ys[-1] ** 2)
    grads = np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, [w1, w2])])
    stats = getattr(gradient, "backward_stats", None)
    return grads, None if stats is None else int(stats.num_fevals)


def test_seminorm_adjoint_agrees_with_the_full_norm_with_fewer_evaluations():
    exact, _ = _mlp_gradient("aca", rtol=1e-8)
    full, full_fevals = _mlp_gradient(tfaca.AdjointGradient())
    semi, semi_fevals = _mlp_gradient(tfaca.AdjointGradient(norm="seminorm"))
    assert semi_fevals < 0.8 * full_fevals, (semi_fevals, full_fevals)
    # Both reverse solves at rtol 1e-6: gradients as accurate, to about the tolerance.
    for got in (full, semi):
        assert relative_error(got, exact) < 1e-4, relative_error(got, exact)
    # Per sample, the parameters' adjoint is a quadrature outside the reverse solve: the
    # seminorm changes nothing.
    per_full, n_full = _mlp_gradient(tfaca.AdjointGradient(), per_sample=True, batch=3)
    per_semi, n_semi = _mlp_gradient(tfaca.AdjointGradient(norm="seminorm"), per_sample=True,
                                     batch=3)
    np.testing.assert_array_equal(per_semi, per_full)
    assert n_semi == n_full
    with pytest.raises(ValueError, match="`norm` must be one of 'full', 'seminorm'"):
        tfaca.AdjointGradient(norm="semi")


def test_layer_keeps_its_step_times_and_floor_in_its_config():
    layer = tfaca.ODELayer(mlp_dynamics(), t=(0.0, 2.0), step_ts=np.array([0.5]),
                           jump_ts=[1.0], min_step=1e-4, force_min_step=True,
                           gradient=tfaca.AdjointGradient(norm="seminorm"))
    config = layer.get_config()
    assert config["step_ts"] == [0.5] and config["jump_ts"] == [1.0]
    assert config["min_step"] == 1e-4 and config["force_min_step"] is True
    assert config["gradient"] == {"name": "adjoint", "rtol": None, "atol": None,
                                  "max_steps": None, "norm": "seminorm"}
    revived = tfaca.ODELayer.from_config(keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)).get_config())
    assert revived.get_config() == config
    assert revived.gradient_strategy.norm == "seminorm"


@pytest.mark.slow  # 10-20 s, the quick suite at CI's limit (stop 45)
def test_layer_with_step_times_floor_and_seminorm_fits():
    layer = tfaca.ODELayer(mlp_dynamics(), t=(0.0, 2.0), step_ts=[0.5], jump_ts=[1.0],
                           min_step=1e-4, force_min_step=True,
                           gradient=tfaca.AdjointGradient(norm="seminorm"))
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile("adam", "mse")
    history = model.fit(x, x, epochs=1, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))

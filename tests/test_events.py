"""Events: detection on the accepted steps' interpolants, root finding, terminal stops per
sample, outputs past the event, and gradients through the event time (implicit function
theorem composed with ACA's replay, or naive backpropagation)."""

import keras
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import tensorflow as tf

import tfaca
from helpers import A_NP, F64, Y0_NP, f64

G, H = 9.81, 2.0
TIGHT = dict(rtol=1e-10, atol=1e-12)


def falling(g):
    """y'' = -g as a first-order system (height, velocity), per sample or not."""
    return lambda t, y: tf.stack([y[..., 1], -g * tf.ones_like(y[..., 1])], axis=-1)


GROUND = tfaca.Event(lambda t, y: y[..., 0], direction=-1)


def _run(mode, fn):
    if mode == "eager":
        return fn()
    return tf.function(fn, jit_compile=mode == "xla")()


@pytest.mark.parametrize("gradient", ["aca", "naive"])
@pytest.mark.parametrize("mode", ["xla", "function", "eager"])
@pytest.mark.slow_variants
def test_falling_body_hits_the_ground_at_the_analytic_time_and_its_gradients(gradient, mode):
    g, h = tf.Variable(G, dtype=F64), tf.Variable(H, dtype=F64)

    def fn():
        with tf.GradientTape(persistent=True) as tape:
            y0 = tf.stack([h, tf.constant(0.0, F64)])
            sol = tfaca.solve(falling(g), y0, [0.0, 5.0], event=GROUND, gradient=gradient,
                              **TIGHT)
            t_star, v_star = sol.event_t, sol.event_y[1]
        return (sol.status, sol.event_index, t_star, *tape.gradient(t_star, [g, h]),
                *tape.gradient(v_star, [g, h]))

    status, index, t_star, dt_dg, dt_dh, dv_dg, dv_dh = _run(mode, fn)
    exact = np.sqrt(2 * H / G)
    assert tfaca.Status(int(status)) == tfaca.Status.EVENT and int(index) == 0
    np.testing.assert_allclose(t_star, exact, rtol=1e-12)
    np.testing.assert_allclose(dt_dg, -exact / (2 * G), rtol=1e-8)
    np.testing.assert_allclose(dt_dh, 1 / (G * exact), rtol=1e-8)
    # v* = -sqrt(2 g h)
    np.testing.assert_allclose(dv_dg, -np.sqrt(2 * H) / (2 * np.sqrt(G)), rtol=1e-8)
    np.testing.assert_allclose(dv_dh, -np.sqrt(2 * G) / (2 * np.sqrt(H)), rtol=1e-8)


def test_outputs_past_the_event_are_the_event_state():
    ts = np.linspace(0.0, 1.0, 11)
    for interpolate in (True, False):
        sol = tfaca.solve(falling(G), f64([H, 0.0]), ts, event=GROUND, interpolate=interpolate,
                          **TIGHT)
        t_star = float(sol.event_t)
        before = ts <= t_star
        exact = np.stack([H - G * ts ** 2 / 2, -G * ts], axis=1)
        np.testing.assert_allclose(sol.ys.numpy()[before], exact[before], rtol=1e-9, atol=1e-9)
        after = sol.ys.numpy()[~before]
        np.testing.assert_array_equal(after, np.broadcast_to(sol.event_y.numpy(), after.shape))
        np.testing.assert_allclose(sol.event_y, [0.0, -np.sqrt(2 * G * H)], atol=1e-9)


def test_threshold_crossing_of_the_linear_system_matches_its_analytic_solution():
    threshold = 0.2
    ev = tfaca.Event(lambda t, y: y[0] - threshold)
    sol = tfaca.solve(lambda t, y: tf.linalg.matvec(f64(A_NP), y), f64(Y0_NP), [0.0, 10.0],
                      event=ev, **TIGHT)
    first = lambda t: (scipy.linalg.expm(A_NP * t) @ Y0_NP)[0] - threshold  # noqa: E731
    grid = np.linspace(0, 10, 2001)
    k = np.argmax(np.sign([first(t) for t in grid]) != np.sign(first(0.0)))
    exact = scipy.optimize.brentq(first, grid[k - 1], grid[k], xtol=1e-15)
    np.testing.assert_allclose(float(sol.event_t), exact, rtol=1e-8)
    np.testing.assert_allclose(sol.event_y, scipy.linalg.expm(A_NP * exact) @ Y0_NP, atol=1e-8)


def test_two_crossings_inside_one_step_are_seen():
    # y = t, one step from 0 to 1: the condition is positive at both ends of the step
    # and negative between 0.3 and 0.6.
    ev = tfaca.Event(lambda t, y: (y[0] - 0.3) * (y[0] - 0.6))
    sol = tfaca.solve(lambda t, y: tf.ones_like(y), f64([0.0]), [0.0, 1.0], event=ev,
                      first_step=1.0)
    assert int(sol.stats.num_steps) == 1
    np.testing.assert_allclose(float(sol.event_t), 0.3, rtol=1e-14)


def test_direction_selects_rising_or_falling_crossings():
    oscillator = lambda t, y: tf.stack([y[1], -y[0]])  # noqa: E731  y = (sin t, cos t)
    # sin starts at zero (no crossing there), falls through zero at pi, rises at 2 pi; one
    # solve records, per direction, its first crossing (several conditions, non-terminal).
    ev = tfaca.Event(lambda t, y: (y[0], y[0], y[0]), direction=(-1, 0, 1), terminal=False,
                     max_events=2)
    sol = tf.function(lambda: tfaca.solve(oscillator, f64([0.0, 1.0]), [0.0, 7.0], event=ev,
                                          **TIGHT))()
    # Both crossings at pi and at 2 pi fire conditions: the first listed wins each.
    np.testing.assert_allclose(sol.event_t, [np.pi, 2 * np.pi], rtol=1e-9)
    np.testing.assert_array_equal(sol.event_index, [0, 1])
    rising = tfaca.Event(lambda t, y: y[0], direction=1)
    sol = tf.function(lambda: tfaca.solve(oscillator, f64([0.0, 1.0]), [0.0, 7.0], event=rising,
                                          **TIGHT))()
    np.testing.assert_allclose(float(sol.event_t), 2 * np.pi, rtol=1e-9)


def test_several_conditions_the_first_to_cross_wins():
    ramp = lambda t, y: tf.ones_like(y)  # noqa: E731
    for conditions, index in [((0.5, 0.9), 0), ((0.9, 0.5), 1)]:
        ev = tfaca.Event(lambda t, y: tuple(y[0] - c for c in conditions), direction=(1, 1))
        sol = tfaca.solve(ramp, f64([0.0]), [0.0, 2.0], event=ev)
        assert int(sol.event_index) == index
        np.testing.assert_allclose(float(sol.event_t), 0.5, rtol=1e-14)


def test_no_event_runs_to_the_end_and_says_so():
    ev = tfaca.Event(lambda t, y: y[0] + 100.0)
    sol = tfaca.solve(falling(G), f64([H, 0.0]), [0.0, 1.0], event=ev, **TIGHT)
    assert tfaca.Status(int(sol.status)) == tfaca.Status.SUCCESS
    assert int(sol.event_index) == -1
    assert float(sol.event_t) == 1.0
    np.testing.assert_array_equal(sol.event_y, sol.ys[-1])


@pytest.mark.parametrize("gradient", ["aca", "naive"])
@pytest.mark.slow_variants
def test_per_sample_events_equal_each_sample_solved_alone(gradient):
    heights = f64([2.0, 0.5, 30.0])
    g = tf.Variable(G, dtype=F64)
    # A drag term makes the problem nonlinear, so that steps and errors matter.
    func = lambda t, y: tf.stack(  # noqa: E731
        [y[:, 1], -g - 0.1 * y[:, 1] * tf.abs(y[:, 1])], axis=1)
    ts = np.linspace(0.0, 2.0, 9)

    def run(y0):
        with tf.GradientTape() as tape:
            tape.watch(y0)
            sol = tfaca.solve(func, y0, ts, event=GROUND, per_sample=True, gradient=gradient,
                              rtol=1e-8, atol=1e-10)
            loss = tf.reduce_sum(sol.event_t ** 2) + tf.reduce_sum(sol.event_y[:, 1])
        return sol, tape.gradient(loss, [y0, g])

    y0 = tf.stack([heights, tf.zeros_like(heights)], axis=1)
    sol, (g_y0, g_g) = run(y0)
    assert tfaca.Status.name_of(sol.status) == ["EVENT", "EVENT", "SUCCESS"]
    g_alone = 0.0
    for b in range(3):
        alone, (g_y0_b, g_g_b) = run(y0[b:b + 1])
        np.testing.assert_allclose(sol.event_t[b], alone.event_t[0], rtol=1e-13)
        np.testing.assert_allclose(sol.event_y[b], alone.event_y[0], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(sol.ys[:, b], alone.ys[:, 0], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(g_y0[b], g_y0_b[0], rtol=1e-10)
        g_alone += g_g_b
    np.testing.assert_allclose(g_g, g_alone, rtol=1e-10)
    assert int(sol.event_index[2]) == -1 and float(sol.event_t[2]) == 2.0


def _drag_problem(k, c):
    func = lambda t, y: tf.stack(  # noqa: E731
        [y[..., 1], -G - k * y[..., 1] * tf.abs(y[..., 1])], axis=-1)
    ev = tfaca.Event(lambda t, y: y[..., 0] - c, direction=-1)
    return func, ev


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
@pytest.mark.slow_variants
def test_aca_equals_naive_backpropagation_through_the_same_steps(per_sample, method):
    """With fixed steps, naive backpropagation differentiates the same discrete solve as
    ACA (no step size depends on the inputs): the event's root on the step's
    interpolant, its state, the outputs before and after it."""
    k, c = tf.Variable(0.3, dtype=F64), tf.Variable(0.25, dtype=F64)
    y0 = tf.constant([[2.0, 1.0], [3.0, -1.0], [1.0, 0.5]], F64)
    grads = {}
    for gradient in ("aca", "naive", tfaca.ACAGradient(checkpoints=2)):
        func, ev = _drag_problem(k, c)
        with tf.GradientTape() as tape:
            tape.watch(y0)
            sol = tfaca.solve(func, y0, np.linspace(0, 3.0, 7), event=ev, per_sample=per_sample,
                              gradient=gradient, method=method, step_size=0.07)
            loss = (tf.reduce_sum(tf.sin(sol.event_t)) + tf.reduce_sum(sol.event_y ** 2)
                    + tf.reduce_sum(sol.ys))
        grads[repr(gradient)] = tape.gradient(loss, [y0, k, c])
    for name, got in grads.items():
        for a, b in zip(got, grads["'naive'"]):
            np.testing.assert_allclose(a, b, rtol=1e-10, err_msg=name)


@pytest.mark.slow  # 14 s; the quick suite checks the gradients against analytic ones
def test_event_gradients_match_finite_differences():
    @tf.function
    def event_state(k, c):
        func, ev = _drag_problem(k, c)
        sol = tfaca.solve(func, f64([2.0, 1.0]), [0.0, 3.0], event=ev, rtol=1e-11, atol=1e-13)
        return tf.concat([sol.event_y, [sol.event_t]], 0)

    k, c = tf.Variable(0.3, dtype=F64), tf.Variable(0.25, dtype=F64)
    jacobian = []
    for part in range(3):  # height, velocity, time
        with tf.GradientTape() as tape:
            out = event_state(k, c)[part]
        jacobian.append(tape.gradient(out, [k, c]))
    for n, (name, var) in enumerate((("k", k), ("c", c))):
        eps = 1e-6
        up = event_state(*(v + eps if v is var else v for v in (k, c)))
        down = event_state(*(v - eps if v is var else v for v in (k, c)))
        fd = (up - down) / (2 * eps)
        got = [row[n] for row in jacobian]
        np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8, err_msg=name)


def test_shared_steps_give_each_sample_its_own_event():
    heights = np.array([2.0, 0.5, 20.0])
    y0 = f64(np.stack([heights, np.zeros(3)], 1))
    sol = tfaca.solve(falling(G), y0, np.linspace(0.0, 1.5, 7), event=GROUND, **TIGHT)
    exact = np.sqrt(2 * heights / G)
    fired = exact < 1.5
    np.testing.assert_allclose(sol.event_t.numpy()[fired], exact[fired], rtol=1e-12)
    np.testing.assert_array_equal(sol.event_index.numpy(), np.where(fired, 0, -1))
    # Not every sample fired: the shared solve ran to its end.
    assert tfaca.Status(int(sol.status)) == tfaca.Status.SUCCESS
    ys = sol.ys.numpy()
    for b in np.flatnonzero(fired):
        past = np.linspace(0.0, 1.5, 7) > exact[b]
        np.testing.assert_array_equal(ys[past, b], np.broadcast_to(sol.event_y[b], (past.sum(), 2)))
    # Once every sample has fired, the shared solve ends there.
    sol = tfaca.solve(falling(G), y0[:2], np.linspace(0.0, 1.5, 7), event=GROUND, **TIGHT)
    assert tfaca.Status(int(sol.status)) == tfaca.Status.EVENT
    assert exact[0] <= float(sol.t_final) < 1.5


def test_gradients_reach_the_conditions_args_and_the_start_time():
    """The threshold passed in `args` and the start time: for an autonomous system the
    event moves with the start, dt*/dt0 = 1; dt*/dc = 1 / y'(t*) at the threshold c."""
    t0, c = tf.Variable(0.5, dtype=F64), tf.Variable(0.25, dtype=F64)
    ev = tfaca.Event(lambda t, y, c: y[0] - c, direction=-1)
    with tf.GradientTape() as tape:
        sol = tfaca.solve(lambda t, y, c: falling(G)(t, y), f64([H, 0.0]),
                          tf.stack([t0, f64(3.0)]), args=(c,),
                          event=ev, **TIGHT)
    d_t0, d_c = tape.gradient(sol.event_t, [t0, c])
    fall = np.sqrt(2 * (H - 0.25) / G)
    np.testing.assert_allclose(float(sol.event_t), 0.5 + fall, rtol=1e-12)
    np.testing.assert_allclose(d_t0, 1.0, rtol=1e-8)
    np.testing.assert_allclose(d_c, 1 / (-G * fall), rtol=1e-8)


def test_times_per_sample_keep_padding_and_events_apart():
    """Per-sample output times (padded rows) with shared steps: each row's outputs past its
    event are its event state, padding repeats its last time's output as without events."""
    heights = np.array([2.0, 20.0])
    y0 = f64(np.stack([heights, np.zeros(2)], 1))
    ts = f64([[0.0, 0.3, 0.9, 0.9], [0.0, 0.5, 1.0, 1.5]])
    sol = tfaca.solve(falling(G), y0, ts, event=GROUND, **TIGHT)
    t_hit = np.sqrt(2 * heights / G)  # 0.639: sample 0 hits between its 0.3 and 0.9
    np.testing.assert_allclose(sol.event_t[0], t_hit[0], rtol=1e-12)
    assert int(sol.event_index[1]) == -1 and float(sol.event_t[1]) == 1.5
    ys = sol.ys.numpy()
    np.testing.assert_allclose(ys[1, 0], [H - G * 0.09 / 2, -G * 0.3], rtol=1e-10)
    np.testing.assert_array_equal(ys[2:, 0], np.broadcast_to(sol.event_y[0], (2, 2)))
    exact = np.stack([20.0 - G * ts.numpy()[1] ** 2 / 2, -G * ts.numpy()[1]], 1)
    np.testing.assert_allclose(ys[:, 1], exact, rtol=1e-10, atol=1e-10)


def test_a_solve_restarted_from_its_event_state_does_not_find_it_again():
    """The event state lies past the crossing as the root finder judged it: a solve from
    there (the next segment of a bouncing ball) finds the next crossing, not this one."""
    oscillator = lambda t, y: tf.stack([y[1], -y[0]])  # noqa: E731
    ev = tfaca.Event(lambda t, y: y[0], direction=-1)
    segment = tf.function(lambda t, y: tfaca.solve(oscillator, y, tf.stack([t, t + 7.0]),
                                                   event=ev, **TIGHT))
    t, y, found = f64(0.0), f64([0.0, 1.0]), []
    for _ in range(3):
        sol = segment(t, y)
        t, y = sol.event_t, sol.event_y
        found.append(float(t))
    np.testing.assert_allclose(found, [np.pi, 3 * np.pi, 5 * np.pi], rtol=1e-9)


# --------------------------------------------------------------------------------------
# Several crossings: max_events, terminal=False
# --------------------------------------------------------------------------------------


def oscillator(omega):
    """y = (x, v), x'' = -omega^2 x: x = sin(omega t) / omega from (0, 1)."""
    return lambda t, y: tf.stack([y[..., 1], -omega ** 2 * y[..., 0]], axis=-1)


@pytest.mark.parametrize("gradient", ["aca", "naive"])
@pytest.mark.slow_variants
def test_non_terminal_events_record_each_crossing_with_its_gradient(gradient):
    omega = tf.Variable(1.3, dtype=F64)
    ev = tfaca.Event(lambda t, y: y[0], terminal=False, max_events=4)
    ts = np.linspace(0.0, 8.0, 17)

    @tf.function
    def run():
        with tf.GradientTape() as tape:
            sol = tfaca.solve(oscillator(omega), f64([0.0, 1.0]), ts, event=ev,
                              gradient=gradient, **TIGHT)
            loss = tf.reduce_sum(sol.event_t[:3] * [1.0, 2.0, 3.0])
        return sol, tape.gradient(loss, omega)

    sol, d_omega = run()
    w = 1.3
    # Zeros of sin(w t) after 0 within [0, 8]: pi/w, 2 pi/w, 3 pi/w (9.67 is past the end).
    np.testing.assert_allclose(sol.event_t[:3], np.pi * np.arange(1, 4) / w, rtol=1e-10)
    assert float(sol.event_t[3]) == 8.0
    np.testing.assert_array_equal(sol.event_index, [0, 0, 0, -1])
    assert tfaca.Status(int(sol.status)) == tfaca.Status.SUCCESS
    # Non-terminal: the outputs are the solve's own, not replaced.
    np.testing.assert_allclose(sol.ys[:, 0], np.sin(w * ts) / w, atol=1e-9)
    # dt_k/domega = -k pi / omega^2
    expected = -np.pi * (1 + 4 + 9) / w ** 2
    np.testing.assert_allclose(d_omega, expected, rtol=1e-8)
    np.testing.assert_allclose(sol.event_y[:3, 1], np.cos(np.pi * np.arange(1, 4)), atol=1e-9)


def test_several_crossings_inside_one_step_fill_several_slots():
    ev = tfaca.Event(lambda t, y: (y[0] - 0.3) * (y[0] - 0.6), terminal=False, max_events=3)
    sol = tfaca.solve(lambda t, y: tf.ones_like(y), f64([0.0]), [0.0, 1.0], event=ev,
                      first_step=1.0)
    assert int(sol.stats.num_steps) == 1
    np.testing.assert_allclose(sol.event_t, [0.3, 0.6, 1.0], rtol=1e-14)
    np.testing.assert_array_equal(sol.event_index, [0, 0, -1])


def test_terminal_event_after_several_crossings_per_sample():
    """terminal=True with max_events=2: each sample ends at its second crossing, its
    outputs past it are its state there; shapes carry the slots after the batch."""
    omegas = f64([1.0, 2.0])
    func = lambda t, y: tf.stack([y[:, 1], -omegas ** 2 * y[:, 0]], axis=1)  # noqa: E731
    ev = tfaca.Event(lambda t, y: y[:, 0], max_events=2)
    ts = np.linspace(0.0, 8.0, 17)
    y0 = f64([[0.0, 1.0], [0.0, 1.0]])
    for per_sample in (False, True):
        sol = tf.function(lambda: tfaca.solve(func, y0, ts, event=ev, per_sample=per_sample,
                                              **TIGHT))()
        assert sol.event_t.shape == (2, 2) and sol.event_y.shape == (2, 2, 2)
        exact = np.pi * np.array([[1, 2], [0.5, 1.0]])
        np.testing.assert_allclose(sol.event_t, exact, rtol=1e-10)
        ys = sol.ys.numpy()
        for b in range(2):
            past = ts > exact[b, 1]
            np.testing.assert_array_equal(ys[past, b],
                                          np.broadcast_to(sol.event_y[b, 1], (past.sum(), 2)))
        status = tfaca.Status.name_of(sol.status)
        assert status == (["EVENT", "EVENT"] if per_sample else "EVENT")


@pytest.mark.slow  # 20-25 s each; the quick suite checks several slots' ACA gradients
# against the analytic ones (test_non_terminal_events_record_each_crossing_with_its_gradient)
@pytest.mark.parametrize("per_sample", [True, False])
def test_aca_equals_naive_through_the_same_steps_with_several_events(per_sample):
    omega, damping = tf.Variable(1.7, dtype=F64), tf.Variable(0.2, dtype=F64)
    func = lambda t, y: tf.stack(  # noqa: E731
        [y[:, 1], -omega ** 2 * tf.sin(y[:, 0]) - damping * y[:, 1]], axis=1)
    ev = tfaca.Event(lambda t, y: (y[:, 0] - 0.1, y[:, 1]), direction=(1, -1), terminal=False,
                     max_events=5)
    y0 = f64([[0.0, 1.5], [0.5, -1.0]])
    grads = []
    for gradient in ("naive", "aca", tfaca.ACAGradient(checkpoints=3)):
        @tf.function
        def run():
            with tf.GradientTape() as tape:
                tape.watch(y0)
                sol = tfaca.solve(func, y0, np.linspace(0, 6.0, 5), event=ev,
                                  per_sample=per_sample, gradient=gradient, step_size=0.1)
                loss = (tf.reduce_sum(tf.cos(sol.event_t)) + tf.reduce_sum(sol.event_y ** 2)
                        + tf.reduce_sum(sol.ys))
            return sol, tape.gradient(loss, [y0, omega, damping])

        sol, got = run()
        grads.append(got)
    assert int(tf.reduce_sum(tf.cast(sol.event_index >= 0, tf.int32))) >= 6
    for got in grads[1:]:
        for a, b in zip(got, grads[0]):
            np.testing.assert_allclose(a, b, rtol=1e-10)


def test_bad_events_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="direction"):
        tfaca.Event(lambda t, y: y, direction=2)
    with pytest.raises(ValueError, match="max_events"):
        tfaca.Event(lambda t, y: y, terminal=False)
    with pytest.raises(ValueError, match="max_events"):
        tfaca.Event(lambda t, y: y, max_events=0)
    with pytest.raises(ValueError, match="terminal"):
        tfaca.Event(lambda t, y: y, terminal=1)
    with pytest.raises(TypeError, match="condition"):
        tfaca.Event(3.0)
    with pytest.raises(ValueError, match="gradient"):
        tfaca.solve(falling(G), f64([H, 0.0]), [0.0, 1.0], event=GROUND, gradient="adjoint")
    with pytest.raises(ValueError, match="direction"):
        tfaca.solve(falling(G), f64([H, 0.0]), [0.0, 1.0],
                    event=tfaca.Event(lambda t, y: (y[0], y[1]), direction=(1,)))
    with pytest.raises(ValueError, match="condition"):
        tfaca.solve(falling(G), f64([[H, 0.0]]), [0.0, 1.0],
                    event=tfaca.Event(lambda t, y: y))
    with pytest.raises(TypeError, match="event"):
        tfaca.solve(falling(G), f64([H, 0.0]), [0.0, 1.0], event=lambda t, y: y[0])


# --------------------------------------------------------------------------------------
# ODELayer(event=...): fit, .keras, SavedModel
# --------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable("tfaca_test_events")
class Gravity(keras.layers.Layer):
    """y = (height, velocity): dy/dt = (velocity, -g), g a weight."""

    def build(self, input_shape):
        self.g = self.add_weight(shape=(), initializer=keras.initializers.Constant(5.0),
                                 name="g")

    def call(self, y):
        return tf.concat([y[:, 1:], -self.g * tf.ones_like(y[:, 1:])], axis=1)


@keras.saving.register_keras_serializable("tfaca_test_events")
def height(t, y):
    return y[:, 0]


@pytest.mark.slow  # 35-43 s, the quick suite at CI's limit (stop 45); the bouncing-ball
# example's quick run fits ODELayer(event=...) and the config test below round-trips it
def test_layer_learns_gravity_from_hitting_times_saves_and_serves(tmp_path):
    heights = np.linspace(0.5, 3.0, 64)
    x = np.stack([heights, np.zeros_like(heights)], 1).astype("float32")
    hit = np.sqrt(2 * heights / G).astype("float32")
    layer = tfaca.ODELayer(Gravity(), t=(0.0, 5.0), event=tfaca.Event(height, direction=-1),
                           return_event_time=True, rtol=1e-6, atol=1e-8)
    inputs = keras.Input((2,))
    state, t_hit = layer(inputs)
    model = keras.Model(inputs, t_hit)
    model.compile(keras.optimizers.Adam(0.25), "mse")
    model.fit(x, hit, epochs=80, batch_size=64, verbose=0)
    np.testing.assert_allclose(float(layer.dynamics.g.numpy()), G, rtol=2e-2)
    predicted = model.predict(x, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[1].event.direction == -1
    np.testing.assert_allclose(loaded.predict(x, verbose=0), predicted, rtol=1e-6)
    model.export(str(tmp_path / "served"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_allclose(served.serve(x), predicted, rtol=1e-6)
    with pytest.raises(ValueError, match="return_event_time"):
        tfaca.ODELayer(Gravity(), return_event_time=True)


def test_layer_with_several_events_returns_a_slot_axis_and_keeps_it_in_its_config():
    event = tfaca.Event(height, direction=0, terminal=False, max_events=3)
    layer = tfaca.ODELayer(Gravity(), t=(0.0, 2.0), event=event, return_event_time=True,
                           rtol=1e-6, atol=1e-8)
    x = np.array([[2.0, 0.0], [0.5, 1.0]], "float32")
    _, t_hit = layer(x)
    assert t_hit.shape == (2, 3) and layer.compute_output_shape((2, 2))[1] == (2, 3)
    # g starts at 5: the drops hit at sqrt(2 h / g), then fall on to t = 2.
    np.testing.assert_allclose(t_hit[0], [np.sqrt(0.8), 2.0, 2.0], rtol=1e-5)
    revived = tfaca.ODELayer.from_config(layer.get_config())
    assert (revived.event.terminal, revived.event.max_events, revived.event.direction) == (
        False, 3, 0)

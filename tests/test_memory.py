"""Memory as a knob: the ALF solver, MALI's gradient and ACA's checkpoint budget.

- ALF converges at its order (2 undamped, 1 damped) and its inverse rebuilds a solve's
  start from its end to rounding;
- MALI's gradient equals backprop through the same ALF steps unrolled in Python (1e-10
  relative in float64), with adaptive and fixed steps, nested states, time gradients;
- a checkpoint budget of every size from 1 to past the number of steps gives full ACA's
  gradient to rounding, eagerly, in a graph and under XLA, keeping at most K states;
- both in `ODELayer`: configs, `.keras` files, `model.fit` and SavedModel;
- the combinations they do not support are refused, naming the argument.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import assert_relative
from tfaca import _control, _loop

A = np.array([[-0.1, 1.0], [-1.0, -0.1]])


def linear(t, y):
    return tf.linalg.matvec(tf.constant(A, y.dtype), y)


def exact_linear(t, y0):
    """exp(t A) y0 for the damped rotation A."""
    c, s = np.cos(t), np.sin(t)
    return np.exp(-0.1 * t) * np.array([[c, s], [-s, c]]) @ y0


class Field:
    """A small nonlinear field with weights and a nested state `(p, q)` of a batch."""

    def __init__(self, dtype=tf.float64, seed=0):
        rng = np.random.default_rng(seed)
        self.W = tf.Variable(rng.normal(size=(5, 5)) * 0.5, dtype=dtype)
        self.b = tf.Variable(rng.normal(size=(5,)) * 0.1, dtype=dtype)

    def __call__(self, t, y):
        p, q = y
        x = tf.concat([p, q], axis=-1)
        out = tf.tanh(tf.linalg.matvec(self.W, x) + self.b) * (1.0 + 0.1 * tf.sin(t))
        return out[:, :2], out[:, 2:]


def nested_y0(dtype=tf.float64, seed=1):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.normal(size=(3, 2)), dtype), tf.constant(rng.normal(size=(3, 3)), dtype))


TS = [0.0, 0.6, 1.3, 2.0]


def _loss(ys):
    """A loss that weighs every output time differently."""
    weights = tf.range(1, ys[0].shape[0] + 1, dtype=ys[0].dtype)
    return sum(tf.reduce_sum(tf.reshape(weights, [-1, 1, 1]) * tf.square(y)) for y in ys)


def _gradients(field, y0, ts, mode="eager", **kwargs):
    """The gradients of `_loss` with respect to y0, ts and the field's weights."""
    y0_vars = [tf.Variable(y) for y in y0]
    ts_var = tf.Variable(tf.constant(ts, y0[0].dtype))

    def run():
        with tf.GradientTape() as tape:
            sol = tfaca.solve(field, tuple(y0_vars), ts_var, interpolate=False, **kwargs)
            loss = _loss(sol.ys)
        grads = tape.gradient(loss, [*y0_vars, ts_var, field.W, field.b])
        return sol.stats.num_steps, grads

    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla")
    num_steps, grads = run()
    return int(num_steps), [g.numpy() for g in grads]


# --------------------------------------------------------------------------------------
# ALF
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damping, order", [(1.0, 2), (0.8, 1)])
def test_alf_converges_at_its_order(damping, order):
    """Fixed steps halved four times: the error falls by 2**order each time."""
    y0 = np.array([1.0, 0.0])
    errors = []
    for h in (0.1, 0.05, 0.025, 0.0125):
        ys = tfaca.odeint(linear, tf.constant(y0), [0.0, 2.0], method=tfaca.ALF(damping=damping),
                          step_size=h, gradient="naive")
        errors.append(np.max(np.abs(ys[-1].numpy() - exact_linear(2.0, y0))))
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    np.testing.assert_allclose(rates, order, atol=0.1)


def test_alf_adaptive_error_follows_the_tolerance():
    y0 = np.array([1.0, 0.0])
    errors, steps = [], []
    for rtol in (1e-3, 1e-5):
        sol = tfaca.solve(linear, tf.constant(y0), [0.0, 2.0], method="alf", rtol=rtol,
                          atol=rtol * 1e-2, gradient="naive", max_steps=5000)
        errors.append(np.max(np.abs(sol.ys[-1].numpy() - exact_linear(2.0, y0))))
        steps.append(int(sol.stats.num_steps))
    assert errors[1] < errors[0] / 10 and errors[0] < 1e-2
    assert steps[1] > steps[0]


@pytest.mark.parametrize("dtype, bound", [(tf.float64, 1e-12), (tf.float32, 1e-4)])
def test_alf_inverse_rebuilds_the_start_from_the_end(dtype, bound):
    """The accepted steps inverted from the end give back y0 (and v0 = f(t0, y0)) to
    rounding: the drift MALI's gradient lives with (benchmarks/mali_memory.md)."""
    field = Field(dtype)
    y0 = nested_y0(dtype)
    solver = tfaca.ALF()
    tol = [tf.constant(1e-4, dtype)] * 2
    controller = _control.StepSizeController(rtol=tol, atol=tol)
    trajectory = _loop.integrate(
        solver, controller, field, tf.constant([0.0, 5.0], dtype), list(y0), step_size=None,
        first_step=None, max_steps=5000, record=True, states=0)
    cp = trajectory.checkpoints
    assert cp.y == () and int(cp.num_steps) > 100
    y, v = cp.y_end, cp.f_end
    for i in reversed(range(int(cp.num_steps))):
        y, v = solver.inverse(field, cp.t[i, 0], y, v, cp.dt[i, 0])
    for rebuilt, start in zip(y, y0):
        drift = np.max(np.abs(rebuilt.numpy() - start.numpy())) / np.max(np.abs(start.numpy()))
        assert drift < bound
    for rebuilt, start in zip(v, field(tf.constant(0.0, dtype), y0)):
        assert np.max(np.abs(rebuilt.numpy() - start.numpy())) < 100 * bound


# --------------------------------------------------------------------------------------
# MALI
# --------------------------------------------------------------------------------------


def _unrolled_alf_gradients(field, y0, ts, solver, rtol):
    """Backprop through the ALF steps the solver accepted, unrolled in Python: each step
    starts at its recorded offset from the output time before it, and the step that
    lands on an output ends on it (so the times get their gradients)."""
    dtype = y0[0].dtype
    tol = [tf.constant(rtol, dtype)] * 2
    controller = _control.StepSizeController(rtol=tol, atol=tol)
    cp = _loop.integrate(
        solver, controller, field, tf.constant(ts, dtype), list(y0), step_size=None,
        first_step=None, max_steps=5000, record=True, states=0).checkpoints
    y0_vars = [tf.Variable(y) for y in y0]
    ts_var = tf.Variable(tf.constant(ts, dtype))
    with tf.GradientTape() as tape:
        y = [tf.identity(v) for v in y0_vars]
        v = list(field(ts_var[0], y))
        outs = [y]
        for i in range(int(cp.num_steps)):
            j, hit = int(cp.interval[i, 0]), bool(cp.hit[i, 0])
            t = ts_var[j - 1] + (cp.t[i, 0] - ts[j - 1])
            dt = ts_var[j] - t if hit else cp.dt[i, 0]
            y, v, _ = solver.step(field, t, y, v, dt)
            if hit:
                outs.append(y)
        loss = _loss([tf.stack(parts) for parts in zip(*outs)])
    grads = tape.gradient(loss, [*y0_vars, ts_var, field.W, field.b])
    return int(cp.num_steps), [g.numpy() for g in grads]


def test_mali_equals_backprop_through_the_same_alf_steps():
    field, y0 = Field(), nested_y0()
    solver = tfaca.ALF()
    n, got = _gradients(field, y0, TS, method=solver, gradient="mali", rtol=1e-4, atol=1e-4)
    n_ref, expected = _unrolled_alf_gradients(field, y0, TS, solver, 1e-4)
    assert n == n_ref > 50
    assert_relative(got, expected, 1e-10)


def test_mali_damped_few_steps_is_exact_and_many_steps_drift_is_reported():
    """The damped inverse magnifies rounding by 1 / |1 - 2 damping| per step: over a few
    steps MALI's gradient is still backprop's; over many, the rebuilt start drifts
    and the gradient raises instead of being silently wrong."""
    field, y0 = Field(), nested_y0()
    solver = tfaca.ALF(damping=0.8)
    n, got = _gradients(field, y0, TS, method=solver, gradient="mali", rtol=1e-2, atol=1e-2)
    n_ref, expected = _unrolled_alf_gradients(field, y0, TS, solver, 1e-2)
    assert n == n_ref and n < 25
    assert_relative(got, expected, 1e-8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="did not rebuild the start"):
        _gradients(field, y0, TS, method=solver, gradient="mali", step_size=0.01)


def test_mali_with_fixed_steps_equals_naive():
    """Fixed steps do not depend on the inputs, so naive backprop through the loop is
    backprop through the same steps."""
    field, y0 = Field(), nested_y0()
    _, got = _gradients(field, y0, TS, method="alf", step_size=0.05, gradient="mali")
    _, expected = _gradients(field, y0, TS, method="alf", step_size=0.05, gradient="naive")
    assert_relative(got, expected, 1e-10)


def test_alf_gradient_modes_agree():
    """MALI, naive and the adjoint on ALF's solve: three ways to one gradient, to the
    solve's accuracy; the adjoint's reverse solve runs ALF on the augmented system."""
    field, y0 = Field(), nested_y0()
    kwargs = dict(method="alf", step_size=0.02)
    _, mali = _gradients(field, y0, [0.0, 1.0], gradient="mali", **kwargs)
    for gradient, rtol in (("naive", 1e-10), ("adjoint", 1e-3)):
        _, other = _gradients(field, y0, [0.0, 1.0], gradient=gradient, **kwargs)
        assert_relative(other, mali, rtol)


@pytest.mark.parametrize("mode", ["graph", "xla"])
@pytest.mark.slow_variants
def test_mali_in_graphs_equals_eager(mode):
    field, y0 = Field(), nested_y0()
    kwargs = dict(method="alf", gradient="mali", rtol=1e-4, atol=1e-4)
    n, expected = _gradients(field, y0, TS, **kwargs)
    n_graph, got = _gradients(field, y0, TS, mode=mode, **kwargs)
    assert n_graph == n
    assert_relative(got, expected, 1e-9)


def test_mali_float32_gradient_is_close_to_float64():
    field64, field32 = Field(tf.float64), Field(tf.float32)
    kwargs = dict(method="alf", gradient="mali", step_size=0.02)
    _, g64 = _gradients(field64, nested_y0(tf.float64), TS, **kwargs)
    _, g32 = _gradients(field32, nested_y0(tf.float32), TS, **kwargs)
    assert_relative(g32, g64, 1e-4)


# --------------------------------------------------------------------------------------
# ACA with a checkpoint budget
# --------------------------------------------------------------------------------------


def test_budget_keeps_at_most_k_evenly_spaced_states():
    field, y0 = Field(), nested_y0()
    tol = [tf.constant(1e-9, tf.float64)] * 2
    controller = _control.StepSizeController(rtol=tol, atol=tol)

    def run(states):
        return _loop.integrate(
            tfaca.Dopri5(), controller, field, tf.constant(TS, tf.float64), list(y0),
            step_size=None, first_step=None, max_steps=1000, record=True,
            states=states).checkpoints

    full = run(None)
    n = int(full.num_steps)
    assert n > 20
    for budget in (1, 2, 3, 5, 8, n, n + 3):
        cp = run(budget)
        stride = int(cp.stride)
        kept = int(cp.y[0].shape[0])
        assert kept == -(-n // stride) <= budget
        assert stride == 1 or kept > budget // 2  # thinned no further than needed
        for slot in range(kept):
            for a, b in zip(cp.y, full.y):
                np.testing.assert_array_equal(a[slot].numpy(), b[slot * stride].numpy())
        for a, b in zip(cp.y_end, full.y):
            np.testing.assert_array_equal(a.numpy(), b[n].numpy())


@pytest.fixture(scope="module")
def full_aca():
    field, y0 = Field(), nested_y0()
    kwargs = dict(rtol=1e-7, atol=1e-7)
    n, grads = _gradients(field, y0, TS, gradient="aca", **kwargs)
    return field, y0, kwargs, n, grads


def test_budget_equals_full_aca_for_every_budget(full_aca):
    field, y0, kwargs, n, expected = full_aca
    assert n >= 12
    for budget in range(1, n + 2):
        steps, got = _gradients(field, y0, TS, gradient=tfaca.ACAGradient(checkpoints=budget),
                                **kwargs)
        assert steps == n
        assert_relative(got, expected, 1e-13)


@pytest.mark.parametrize("mode", ["xla", "graph"])
@pytest.mark.slow_variants
def test_budget_in_graphs_equals_full_aca(full_aca, mode):
    field, y0, kwargs, n, expected = full_aca
    for budget in (1, 4, n + 2):
        _, got = _gradients(field, y0, TS, mode=mode,
                            gradient=tfaca.ACAGradient(checkpoints=budget), **kwargs)
        assert_relative(got, expected, 1e-12)


def _counted_backward(field, y0, gradient, interpolate, **kwargs):
    """`(stats, calls, grads)`: a solve's statistics, how often the backward pass called the
    field (eagerly, loops not compiled, so that every call runs Python) and the gradients."""
    calls = [0]

    def func(t, y):
        calls[0] += 1
        return field(t, y)

    ys_ts = np.linspace(0.0, 2.0, 9) if interpolate else TS
    y0_vars = [tf.Variable(y) for y in y0]
    with tf.GradientTape() as tape:
        sol = tfaca.solve(func, tuple(y0_vars), ys_ts, gradient=gradient,
                          interpolate=interpolate, **kwargs)
        loss = _loss(sol.ys)
    calls[0] = 0
    grads = tape.gradient(loss, [*y0_vars, field.W, field.b])
    return sol.stats, calls[0], [g.numpy() for g in grads]


@pytest.mark.parametrize("interpolate", [False, True], ids=["land", "dense"])
def test_budget_counts_its_evaluations(interpolate):
    """With a budget, `num_fevals_backward` is what the replay calls: the entries' stages
    and the forward steps it rebuilds, one fewer per segment than the segment's entries
    (a stride of 1 rebuilds nothing)."""
    field, y0 = Field(), nested_y0()
    kwargs = dict(rtol=1e-7, atol=1e-7, jit_compile=False)
    full, full_calls, _ = _counted_backward(field, y0, "aca", interpolate, **kwargs)
    n = int(full.num_steps)
    assert full_calls == int(full.num_fevals_backward)
    stages = tfaca.Dopri5.tableau.solution_stages
    for budget in (1, 3, n // 2, n):
        stats, calls, _ = _counted_backward(
            field, y0, tfaca.ACAGradient(checkpoints=budget), interpolate, **kwargs)
        assert calls == int(stats.num_fevals_backward), budget
        rebuilt = calls - full_calls
        if budget >= n:
            assert rebuilt == 0
        else:
            assert 0 < rebuilt < n * stages, budget


def test_compiled_aca_keeps_at_most_xla_states(monkeypatch):
    """Where XLA compiles the loop and `max_steps` exceeds `_record.XLA_STATES`, ACA keeps
    at most that many states, as `ACAGradient(checkpoints=XLA_STATES)`: the same gradient
    as every state kept (to rounding), and the rebuilt steps counted. Below, nothing
    changes."""
    from tfaca import _record

    monkeypatch.setattr(_record, "XLA_STATES", 4)
    field, y0 = Field(), nested_y0()
    kwargs = dict(rtol=1e-7, atol=1e-7)
    full, _, expected = _counted_backward(field, y0, "aca", False, jit_compile=False,
                                          max_steps=500, **kwargs)
    n = int(full.num_steps)
    assert n > 4 * 2
    budget, _, _ = _counted_backward(field, y0, tfaca.ACAGradient(checkpoints=4), False,
                                     jit_compile=False, **kwargs)
    capped, _, got = _counted_backward(field, y0, "aca", False, jit_compile=True, max_steps=500,
                                       **kwargs)
    assert_relative(got, expected, 1e-12)
    assert int(capped.num_fevals_backward) == int(budget.num_fevals_backward)
    assert int(capped.num_fevals_backward) > int(full.num_fevals_backward)
    monkeypatch.setattr(_record, "XLA_STATES", 500)
    every, _, got = _counted_backward(field, y0, "aca", False, jit_compile=True, max_steps=500,
                                      **kwargs)
    assert_relative(got, expected, 1e-12)
    assert int(every.num_fevals_backward) == int(full.num_fevals_backward)


def test_budget_reports_a_func_that_does_not_reproduce():
    """A random func rebuilds other states in the backward pass: raised, as full ACA."""
    y0 = tf.Variable([1.0, 0.5])
    with tf.GradientTape() as tape:
        ys = tfaca.odeint(lambda t, y: -y * tf.random.uniform([], 0.5, 1.5), y0, [0.0, 1.0],
                          gradient=tfaca.ACAGradient(checkpoints=2), method="rk4",
                          step_size=0.1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="did not reproduce"):
        tape.gradient(ys, y0)


# --------------------------------------------------------------------------------------
# Options, refusals
# --------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "4"])
def test_bad_budget_is_refused(value):
    with pytest.raises(ValueError, match="checkpoints"):
        tfaca.ACAGradient(checkpoints=value)


@pytest.mark.parametrize("value", [0.0, 0.5, 1.5, -1.0, "1"])
def test_bad_damping_is_refused(value):
    with pytest.raises(ValueError, match="damping"):
        tfaca.ALF(damping=value)


def test_mali_second_derivative_raises():
    field, y0 = Field(), nested_y0()
    x = tf.Variable(y0[0])
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            ys = tfaca.odeint(field, (x, y0[1]), [0.0, 1.0], method="alf", gradient="mali")
            loss = tf.reduce_sum(ys[0] ** 2)
        g = inner.gradient(loss, x)
        penalty = tf.reduce_sum(g ** 2)
    with pytest.raises(NotImplementedError, match="MALI"):
        outer.gradient(penalty, x)


# --------------------------------------------------------------------------------------
# ODELayer
# --------------------------------------------------------------------------------------


def _dynamics():
    return keras.Sequential([keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(4)])


@pytest.mark.parametrize(
    "kwargs, method, gradient",
    [
        (dict(method=tfaca.ALF(damping=0.8), gradient="mali", rtol=1e-2, atol=1e-3),
         {"name": "alf", "damping": 0.8}, "mali"),
        (dict(gradient=tfaca.ACAGradient(checkpoints=3)), "dopri5",
         {"name": "aca", "checkpoints": 3}),
        (dict(gradient=tfaca.AdjointGradient(rtol=1e-6)), "dopri5",
         {"name": "adjoint", "rtol": 1e-6, "atol": None, "max_steps": None}),
    ],
    ids=["alf_mali", "aca_budget", "adjoint_options"],
)
def test_layer_config_holds_built_ins_with_options(kwargs, method, gradient):
    layer = tfaca.ODELayer(_dynamics(), **kwargs)
    config = layer.get_config()
    assert config["method"] == method and config["gradient"] == gradient
    restored = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(layer))))
    assert restored.get_config() == config
    assert repr(restored.gradient_strategy) == repr(layer.gradient_strategy)


@pytest.mark.parametrize(
    "kwargs",
    [dict(method="alf", gradient="mali", rtol=1e-2, atol=1e-3),
     dict(gradient=tfaca.ACAGradient(checkpoints=2))],
    ids=["mali", "budget"],
)
def test_layer_fits_saves_and_serves(tmp_path, kwargs):
    """model.fit, a .keras round trip and a SavedModel served, with MALI and a budget."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = np.sin(x).sum(axis=1, keepdims=True).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
                              tfaca.ODELayer(_dynamics(), **kwargs), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    history = model.fit(x, y, epochs=6, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0]
    expected = model(x).numpy()
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(loaded(x).numpy(), expected)
    model.export(str(tmp_path / "saved"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(served.serve(x).numpy(), expected, rtol=1e-5, atol=1e-6)

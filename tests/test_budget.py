"""ACA with a checkpoint budget (`ACAGradient(checkpoints=K)`, `tfaca._record`): the loop
keeps at most K evenly spaced states and the backward pass recomputes the others; for
every budget from 1 to past the number of steps the gradient is full ACA's to rounding,
eagerly, in a graph and under XLA, with stepped-onto and interpolated outputs."""

import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import (
    GRADIENT_NAMES, MLP_TIMES, NESTED_TS, assert_relative, field_gradients, mlp_gradients,
    nested_y0, NestedField, recorded_trajectory, weighted_loss,
)


# --------------------------------------------------------------------------------------
# ACA with a checkpoint budget
# --------------------------------------------------------------------------------------


def test_budget_keeps_at_most_k_evenly_spaced_states():
    field, y0 = NestedField(), nested_y0()

    def run(states):
        return recorded_trajectory(tfaca.Dopri5(), field, NESTED_TS, y0, 1e-9, states=states,
                                   max_steps=1000).checkpoints

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
    field, y0 = NestedField(), nested_y0()
    kwargs = dict(rtol=1e-7, atol=1e-7)
    n, grads = field_gradients(field, y0, NESTED_TS, gradient="aca", **kwargs)
    return field, y0, kwargs, n, grads


def test_budget_equals_full_aca_for_every_budget(full_aca):
    field, y0, kwargs, n, expected = full_aca
    assert n >= 12
    for budget in range(1, n + 2):
        steps, got = field_gradients(field, y0, NESTED_TS, gradient=tfaca.ACAGradient(checkpoints=budget),
                                **kwargs)
        assert steps == n
        assert_relative(got, expected, 1e-13)


@pytest.mark.parametrize("mode", ["xla", "graph"])
@pytest.mark.slow_variants
def test_budget_in_graphs_equals_full_aca(full_aca, mode):
    field, y0, kwargs, n, expected = full_aca
    for budget in (1, 4, n + 2):
        _, got = field_gradients(field, y0, NESTED_TS, mode=mode,
                            gradient=tfaca.ACAGradient(checkpoints=budget), **kwargs)
        assert_relative(got, expected, 1e-12)


def _counted_backward(field, y0, gradient, interpolate, **kwargs):
    """`(stats, calls, grads)`: a solve's statistics, how often the backward pass called the
    field (eagerly, loops not compiled, so that every call runs Python) and the gradients."""
    calls = [0]

    def func(t, y):
        calls[0] += 1
        return field(t, y)

    ys_ts = np.linspace(0.0, 2.0, 9) if interpolate else NESTED_TS
    y0_vars = [tf.Variable(y) for y in y0]
    with tf.GradientTape() as tape:
        sol = tfaca.solve(func, tuple(y0_vars), ys_ts, gradient=gradient,
                          interpolate=interpolate, **kwargs)
        loss = weighted_loss(sol.ys)
    calls[0] = 0
    grads = tape.gradient(loss, [*y0_vars, field.W, field.b])
    return sol.stats, calls[0], [g.numpy() for g in grads]


@pytest.mark.parametrize("interpolate", [False, True], ids=["land", "dense"])
@pytest.mark.slow_variants  # "dense" 12-23 s: the quick suite at CI's limit (stop 45)
def test_budget_counts_its_evaluations(interpolate):
    """With a budget, `num_fevals_backward` is what the replay calls: the entries' stages
    and the forward steps it rebuilds, one fewer per segment than the segment's entries
    (a stride of 1 rebuilds nothing)."""
    field, y0 = NestedField(), nested_y0()
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


@pytest.mark.slow  # 11-23 s: the quick suite at CI's limit (stop 45)
def test_compiled_aca_keeps_at_most_xla_states(monkeypatch):
    """Where XLA compiles the loop and `max_steps` exceeds `_record.XLA_STATES`, ACA keeps
    at most that many states, as `ACAGradient(checkpoints=XLA_STATES)`: the same gradient
    as every state kept (to rounding), and the rebuilt steps counted. Below, nothing
    changes."""
    from tfaca import _record

    monkeypatch.setattr(_record, "XLA_STATES", 4)
    field, y0 = NestedField(), nested_y0()
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


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("times", sorted(MLP_TIMES))
@pytest.mark.slow_variants
def test_budget_with_interpolated_outputs_equals_full_aca(times, per_sample):
    full = mlp_gradients("aca", MLP_TIMES[times], per_sample=per_sample)
    for budget in (1, 2, 5):
        kept = mlp_gradients(tfaca.ACAGradient(checkpoints=budget), MLP_TIMES[times],
                          per_sample=per_sample)
        assert_relative(kept, full, 1e-12, names=GRADIENT_NAMES, floor=1.0)


# --------------------------------------------------------------------------------------
# Options, refusals
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "4"])
def test_bad_budget_is_refused(value):
    with pytest.raises(ValueError, match="checkpoints"):
        tfaca.ACAGradient(checkpoints=value)

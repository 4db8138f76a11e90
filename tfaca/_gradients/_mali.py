"""MALI (Zhuang, Dvornek, Tatikonda & Duncan, "MALI: A memory efficient and reverse accurate
integrator for Neural ODEs", ICLR 2021): exact gradients of the ALF steps with memory
constant in the number of steps, by inverting each step instead of keeping its state."""

import math

import tensorflow as tf

from tfaca import _outputs
from tfaca._gradients._base import (
    DRIFTED, SECOND_ORDER, AbstractGradient, accumulate, check_replay, compiled, differs,
    forward_solve, loop_options, solve_with_custom_gradient, sources_with, times_of,
)
from tfaca._internals import could_possibly_record, stop_recording
from tfaca._gradients._replay import (
    add_landed, covered, group_dot, jumped, onto_stops, setting_of, to_groups,
)
from tfaca._record import before_jump


class MALIGradient(AbstractGradient):
    """MALI: exact gradients of the ALF steps with memory constant in the number of steps.

    Only with an invertible solver (`method="alf"`): the forward pass keeps the end state
    `(y_N, v_N)` and each accepted step's `(t_i, dt_i)` (scalars); the backward pass, for
    `i = N - 1 ... 0`, rebuilds the step's input `(y_i, v_i)` from its output with
    `ALF.inverse` (one evaluation of `func`) and pulls the cotangents `(a_y, a_v)` back
    through the step, reusing that evaluation's vector-Jacobian product: the step is
    `k = y + v h/2, u = func(t + h/2, k), v' = v + 2 damping (u - v), y' = k + v' h/2`, and
    `func` at `k` is all it evaluates. Last, `a_v` is pulled through
    `v_0 = func(t_0, y_0)`. Backward cost: one evaluation of `func` and its
    vector-Jacobian product per step, plus one.

    Outputs inside a step (the default `interpolate=True`) are read from ALF's cubic
    Hermite interpolant through `(y_i, v_i)` and `(y_{i+1}, v_{i+1})`, the states the
    backward pass rebuilds: their cotangents are pulled back through it there, at no
    evaluation of `func`. Per-sample steps are replayed entry by entry as ACA's are.
    Where `func` jumps (`jump_ts`, the knots of a linear or rectilinear path), the step
    after the jump starts from `v = func(t+, y)`, evaluated afresh: the forward keeps the
    `v` the step before left (one state per jump, `Checkpoints.f_jump`), and the
    backward pulls `a_v` through that evaluation (one more evaluation per jump) and
    inverts on from the kept `v`.

    The gradient is that of the accepted ALF steps with their sizes fixed, as ACA's is of
    the Runge–Kutta steps; it differs from backprop through those steps only by the
    rounding of the rebuilt states (`benchmarks/mali_memory.md` measures it). The
    gradient cannot be differentiated again (second derivatives raise).
    """

    name = "mali"

    def solve(self, solver, controller, func, plan, y0, args, *, per_sample=False, throw=True,
              jit=False, **loop_kwargs):
        if not solver.invertible:
            raise ValueError(
                'gradient="mali" needs an invertible method, method="alf": it rebuilds each '
                "step from the next by inverting the step, which only ALF's asynchronous "
                f"leapfrog can. Received: method={solver!r}")
        options = loop_options(controller, dict(loop_kwargs, per_sample=per_sample))

        def forward_with(record):
            forward = forward_solve(solver, func, jit, record=record, states=0)
            return lambda times, y0, args: forward(times, y0, args, options)

        record = could_possibly_record()

        def backward(trajectory, times, y0, sources, g_ys, variables, differentiable, _=None):
            del differentiable  # refused: second_order below
            if not record:
                with stop_recording():
                    trajectory = forward_with(True)(times, y0, args)
            replay = compiled(lambda checkpoints, times, y0, g_ys, args, jumps: _mali_replay(
                solver, lambda t, y: func(t, y, args), checkpoints, times, y0,
                sources_with(sources, args), g_ys, variables, per_sample, jumps),
                jit, ("replay",))
            drifted, grads = replay(trajectory.checkpoints, times, y0, g_ys, args,
                                    loop_kwargs.get("jumps"))
            return check_replay(drifted, grads, throw, DRIFTED)

        trajectory = solve_with_custom_gradient(
            forward_with(record), backward, func, times_of(plan), y0, args,
            second_order=SECOND_ORDER.format(
                what="MALI does not support",
                instead='Use gradient="naive" with method="alf".'),
            t_shape=y0[0].shape[:1] if per_sample else (),
        )
        stats = trajectory.stats
        return trajectory._replace(stats=stats._replace(num_fevals_backward=stats.num_steps + 1))


def _mali_entry(solver, f, setting, cp, i, y1, v1, a_y, a_v, g_stops, g_sources, g_vars, g_ts,
                sources, variables):
    """Entry `i` of MALI's backward pass: rebuilds the step's start `(y_i, v_i)` from its
    end `(y1, v1)` and pulls `(a_y, a_v)` back through the step and its outputs."""
    groups, lam = setting.groups, solver.damping
    if setting.jumps is not None:
        v1, a_y, a_v, g_sources, g_vars = _back_across_jump(
            f, setting, cp, i, y1, v1, a_y, a_v, g_sources, g_vars, sources, variables)
    t, dt, accepted = (tf.gather(x, i) for x in (cp.t, cp.dt, cp.accepted))
    hit, j = tf.gather(cp.hit, i) & accepted, tf.gather(cp.interval, i)
    if not setting.dense:
        a_y = add_landed(setting, a_y, j, hit)
    half = 0.5 * dt
    s1 = t + half
    k = solver.midpoint(y1, v1, groups.lane(dt))
    with tf.GradientTape() as tape:
        tape.watch([s1] + k + list(sources))
        u = f(groups.lane(s1), k)
    y0_, v0 = solver.start(k, u, v1, groups.lane(dt))
    g_t_out = g_dt_out = 0.0
    if setting.dense:
        # The outputs inside: Hermite through (y_i, v_i) and (y_{i+1}, v_{i+1}).
        lo, hi, t_rows, dt_rows = covered(setting, cp, i)
        pulled = _outputs.pullback_step(solver, setting.ts_rows, lo, hi, t_rows, dt_rows,
                                        [v0, v1], setting.g_rows, g_ts, setting.by_batch)
        g_ts, (g_v0_out, g_v1_out) = pulled.g_ts, pulled.g_stages
        a_v = [a + g for a, g in zip(a_v, g_v1_out)]
        g_t_out, g_dt_out = to_groups(setting, pulled.g_t), to_groups(setting, pulled.g_dt)
    spread = lambda v, x: groups.spread(v, x)  # noqa: E731
    on = lambda xs: [tf.where(spread(accepted, x), x, tf.zeros_like(x)) for x in xs]  # noqa: E731
    # Cotangents through v' = v + 2 lam (u - v) and y' = k + v' h/2.
    bar_v1 = [av + spread(half, ay) * ay for av, ay in zip(on(a_v), on(a_y))]
    bar_u = [2.0 * lam * b for b in bar_v1]
    g_s1, g_k, g_s, g_v = tape.gradient(
        u, [s1, k, list(sources), list(variables)], output_gradients=bar_u,
        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    bar_k = [ay + tf.convert_to_tensor(gk) for ay, gk in zip(on(a_y), g_k)]
    new_a_v = [(1.0 - 2.0 * lam) * b + spread(half, bk) * bk for b, bk in zip(bar_v1, bar_k)]
    g_dt = 0.5 * (group_dot(groups, on(a_y), v1) + group_dot(groups, bar_k, v0) + g_s1)
    g_t = g_s1
    if setting.dense:
        bar_k = [b + g for b, g in zip(bar_k, pulled.g_y)]
        new_a_v = [b + g for b, g in zip(new_a_v, g_v0_out)]
    g_t = tf.where(accepted, g_t + g_t_out, tf.zeros_like(g_t))
    g_stops = onto_stops(setting, g_stops, j, hit, g_t, g_dt + g_dt_out)
    g_sources = accumulate(g_sources, g_s)
    g_vars = accumulate(g_vars, g_v)
    select = groups.select
    return (select(accepted, y0_, y1), select(accepted, v0, v1), select(accepted, bar_k, a_y),
            select(accepted, new_a_v, a_v), g_stops, g_sources, g_vars, g_ts)


def _back_across_jump(f, setting, cp, i, y1, v1, a_y, a_v, g_sources, g_vars, sources,
                      variables):
    """Where entry `i` landed on a jump, the next step started from `v = func(t+, y)`,
    evaluated afresh one ulp past it: `a_v` is pulled back through that evaluation into
    `a_y` (and the sources and variables), and `v` becomes what the step left there
    (`Checkpoints.f_jump`), from which the inverse steps go on."""
    groups = setting.groups
    here = jumped(setting, cp, i)

    def across():
        t_after = tf.gather(cp.t, i + 1)
        g_fresh = [tf.where(groups.spread(here, a), a, tf.zeros_like(a)) for a in a_v]
        with tf.GradientTape() as tape:
            tape.watch(list(y1) + list(sources))
            fresh = f(groups.lane(t_after), list(y1))
        g_y, g_s, g_v = tape.gradient(
            fresh, [list(y1), list(sources), list(variables)], output_gradients=g_fresh,
            unconnected_gradients=tf.UnconnectedGradients.ZERO)
        stop = tf.gather(cp.interval, i)
        v_before = before_jump(cp.f_jump, setting.jumps, stop, groups.shared)
        return ([a + tf.convert_to_tensor(g) for a, g in zip(a_y, g_y)],
                groups.select(here, v_before, v1),
                groups.select(here, [tf.zeros_like(a) for a in a_v], a_v),
                accumulate(g_sources, g_s), accumulate(g_vars, g_v))

    def stay():
        return list(a_y), list(v1), list(a_v), list(g_sources), list(g_vars)

    a_y, v1, a_v, g_sources, g_vars = tf.cond(tf.reduce_any(here), across, stay)
    return v1, a_y, a_v, g_sources, g_vars


def _mali_replay(solver, f, checkpoints, times, y0, sources, g_ys, variables, per_sample,
                 jumps=None):
    """MALI's backward pass (see `MALIGradient`). Returns `(drifted, grads)`: the number of
    steps if the rebuilt start differs from `y0` by more than `sqrt(eps)` relative, else
    -1 (`check_replay` reports it), and the gradients of the times, `y0`, the sources and
    the variables, as one flat list."""
    cp = checkpoints
    setting = setting_of(times, g_ys, per_sample, y0, jumps)
    groups = setting.groups

    def body(i, *carry):
        return (i - 1, *_mali_entry(solver, f, setting, cp, i, *carry, sources, variables))

    n = cp.num_steps
    zeros = [tf.zeros_like(y) for y in y0]
    g_ts = tf.zeros_like(setting.ts_rows) if setting.dense else tf.zeros([])
    state = (n - 1, list(cp.y_end), list(cp.f_end), zeros, zeros, tf.zeros_like(setting.stops),
             [tf.zeros_like(x) for x in sources], [tf.zeros_like(v) for v in variables], g_ts)
    # One step's graph at a time (see `_aca._replay`).
    _, y_start, _, a_y, a_v, g_stops, g_sources, g_vars, g_ts = tf.while_loop(
        lambda i, *_: i >= 0, body, state, parallel_iterations=1)
    eps = float(tf.experimental.numpy.finfo(times[0].dtype.as_numpy_dtype).eps)
    # Rounding builds up at the scale the states reach, not at y0's: a component that
    # starts at 0 (a log-density, a zero hidden state) is compared at its end's scale.
    drifted = tf.where(differs(y_start, y0, math.sqrt(eps), also=cp.y_end), n, -1)
    # v_0 = func(t_0, y_0), from the inputs themselves (not the rebuilt state).
    t0 = setting.stops[:, 0]
    with tf.GradientTape() as tape:
        tape.watch([t0] + list(y0) + list(sources))
        f0 = f(groups.lane(t0), list(y0))
    g_t0, g_y, g_s, g_v = tape.gradient(
        f0, [t0, list(y0), list(sources), list(variables)], output_gradients=a_v,
        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    g_stops = g_stops + tf.one_hot(0, tf.shape(g_stops)[1], dtype=g_stops.dtype) * g_t0[:, None]
    stops = times[0]
    g_times = [tf.reduce_sum(g_stops, axis=0) if stops.shape.rank == 1 else g_stops]
    if setting.dense:
        g_later = g_ts[:, 1:]
        g_times.append(tf.reduce_sum(g_later, axis=0) if times[1].shape.rank == 1 else g_later)
    g_y0 = [a + tf.convert_to_tensor(g) + g_out[0] for a, g, g_out in zip(a_y, g_y, g_ys)]
    g_sources = accumulate(g_sources, g_s)
    g_vars = accumulate(g_vars, g_v)
    return drifted, [*g_times, *g_y0, *g_sources, *g_vars]

"""The continuous adjoint (Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary
Differential Equations", NeurIPS 2018): keep only the outputs and solve the adjoint system
backwards in time. Memory O(state), but the reverse solve of `y` drifts from the forward
one (Zhuang et al. 2020, Table 1, Fig. 4), and the gradient with it. Its gradient cannot
be differentiated again: doing so raises."""

import dataclasses

import tensorflow as tf

from tfaca._gradients._base import (
    SECOND_ORDER, AbstractGradient, compiled, forward_solve, loop_options, nan_where,
    solve_with_custom_gradient, sources_with, times_of, unpack,
)
from tfaca._gradients._replay import group_dot, setting_of
from tfaca._loop import Groups, integrate, raise_on_failure
from tfaca._outputs import Plan, at_stop, with_stops
from tfaca._solution import Stats
from tfaca._solvers import _weighted_sum, per_row


# The reverse solve's error norms (`AdjointGradient(norm=...)`).
NORMS = ("full", "seminorm")


class AdjointGradient(AbstractGradient):
    """The continuous adjoint of Chen, Rubanova, Bettencourt & Duvenaud (NeurIPS 2018).

    Keeps only the outputs; the backward pass solves the augmented system
    `[y, a, g_args, g_vars]` backwards from each output time to the previous one (with
    times per sample, through every sample's times in time order, one solve for the
    batch, resetting only that sample's state at its time),
    `dy/dt = f`, `da/dt = -a^T df/dy`, `dg/dt = -a^T df/d(args, variables)`, with the
    same solver. At each output time `y` is reset to the forward value and `a` receives
    that output's cotangent (as torchdiffeq does). Time gradients need no extra
    integral: `dL/dts[j] = <dL/dys[j], f(ts[j], ys[j])>` for `j >= 1` and
    `dL/dts[0] = -<a(ts[0]), f(ts[0], y0)>`.

    Memory O(state) in the number of steps, but the reverse solve of `y` drifts from
    the forward trajectory (Zhuang et al. 2020, Fig. 4), so the gradient is only as
    accurate as that reverse solve: the point of comparison for ACA. Its gradient cannot
    be differentiated again (second derivatives raise; use `"aca"` or `"naive"`), and a
    `func` that draws random numbers gives a wrong gradient that nothing can detect
    (`ODELayer` draws Keras random layers once per call, which makes them safe).

    Args:
        rtol, atol: tolerances of the reverse solve (scalars); default: those of the
            forward solve (for parameter components, the smallest forward tolerance).
        max_steps: trial-step bound per output interval of the reverse solve; default:
            the forward's.
        norm: the reverse solve's error norm: `"full"` (default) over `[y, a, g_args,
            g_vars]`, or `"seminorm"` (Kidger, Chen & Lyons, "Hey, that's not an ODE",
            ICML 2021) over `[y, a]` only: the parameters' adjoint is an integral that
            nothing downstream of it in the reverse solve reads, so its local error
            need not bound the step; fewer steps for the same gradient when the
            parameters' adjoint is what holds the step size back
            (`benchmarks/step_control.md`). With per-sample steps the parameters'
            adjoint is a quadrature outside the reverse solve already, which both
            norms then leave out.

    Attributes:
        backward_stats: a `Stats` of int64 `tf.Variable`s holding the counts of the
            last reverse solve made with this instance (summed over output intervals;
            all 0 before the first gradient), readable after a gradient computed
            eagerly, in a `tf.function` or under XLA (`int(s.num_fevals)`);
            `ODELayer.gradient_strategy` is the layer's instance. Under a
            `tf.distribute` strategy they count the first replica's solve. An instance
            created inside a `tf.function` or `strategy.run` (as the name "adjoint"
            passed to `solve` there makes one) cannot hold variables: `None`.
    """

    name = "adjoint"

    def __init__(self, rtol=None, atol=None, max_steps=None, norm="full"):
        if norm not in NORMS:
            raise ValueError(
                f"`norm` must be one of {', '.join(map(repr, NORMS))}. Received: norm={norm!r}")
        self.rtol = rtol
        self.atol = atol
        self.max_steps = max_steps
        self.norm = norm
        self.backward_stats = None
        # Variables cannot be created in a function being traced (a name passed to
        # `solve` there builds a fresh instance whose counters nobody could read) nor
        # inside `strategy.run`.
        in_replica_fn = tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()
        if not (tf.inside_function() or in_replica_fn):
            with tf.init_scope():
                self.backward_stats = Stats(*(
                    tf.Variable(
                        0, dtype=tf.int64, trainable=False, name=f"adjoint_{field}",
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                    )
                    for field in Stats._fields
                ))

    def options(self):
        return {"rtol": self.rtol, "atol": self.atol, "max_steps": self.max_steps,
                "norm": self.norm}

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({options})"

    def solve(self, solver, controller, func, plan, y0, args, *, per_sample=False, throw=True,
              jit=False, **loop_kwargs):
        if solver.implicit:
            # The reverse solve of [y, a, dL/dtheta] would need the Jacobian of the
            # adjoint's own dynamics (a^T df/dy differentiated again, and the parameters'
            # block) at every Newton matrix: refused rather than solved explicitly, which
            # a stiff problem's adjoint, as stiff as the problem, would not survive.
            raise ValueError(
                f"gradient=\"adjoint\" integrates the adjoint backwards with the solver, and "
                f"for method={solver!r} that reverse solve would be implicit too, which tfaca "
                'does not do: use gradient="aca" (exact through the implicit steps, by the '
                'implicit function theorem) or "naive". Received: gradient="adjoint"')
        options = loop_options(controller, dict(loop_kwargs, per_sample=per_sample))
        # The reverse solve needs the outputs and the end state, not the steps.
        run = forward_solve(solver, func, jit, record=False, checkpoints=False)

        def forward(times, y0, args):
            return run(times, y0, args, options)

        def backward(trajectory, times, y0, sources, g_ys, variables, differentiable, _=None):
            # As in ACA's replay. The counts come out and are assigned here, outside the
            # compiled function: a compiled function reused by another instance's solve
            # would count into that instance's. The counters are int64: TensorFlow keeps
            # int32 variables in host memory, where XLA on a GPU cannot reach them (a
            # train step compiled whole, as Keras compiles it on a GPU, assigns them).
            def reverse_solve(trajectory, times, y0, g_ys, args, options):
                controller, loop_kwargs = unpack(options)
                return _reverse_solve(
                    self, solver, controller, func, trajectory, times, y0, args,
                    sources_with(sources, args), g_ys, variables, loop_kwargs, per_sample)

            reverse = compiled(reverse_solve, jit, ("reverse",))
            grads, status, t_final, counts = reverse(trajectory, times, y0, g_ys, args, options)
            if self.backward_stats is not None:
                updates = [v.assign(tf.cast(c, tf.int64))
                           for v, c in zip(self.backward_stats, counts)]
                with tf.control_dependencies(updates):
                    grads = [tf.identity(g) for g in grads]
            # NaN where the reverse solve failed, also with `throw` under XLA, which has no
            # run-time assertion: it stops where it failed, at a finite state.
            grads = nan_where(tf.reduce_any(status != 0), grads)
            if throw:
                return raise_on_failure(status, t_final, grads, "in the adjoint's reverse solve")
            return grads

        refusal = SECOND_ORDER.format(
            what="the adjoint cannot give: its reverse solve takes the forward outputs "
            "as constants", instead='Use gradient="aca" (exact) or "naive".')
        trajectory = solve_with_custom_gradient(
            forward, backward, func, times_of(plan), y0, args, second_order=refusal,
            written=self.backward_stats or (), t_shape=y0[0].shape[:1] if per_sample else (),
        )
        unknown = tf.constant(-1, tf.int32) - tf.zeros_like(trajectory.stats.num_steps)
        return trajectory._replace(stats=trajectory.stats._replace(num_fevals_backward=unknown))


def _reverse_solve(strategy, solver, controller, func, trajectory, times, y0, args, sources,
                   g_ys, variables, loop_kwargs, per_sample):
    """The adjoint's one reverse solve: the gradients (a flat list), its status, where it
    ended, and its counts for `backward_stats` (steps, rejected, evaluations, 0).

    One `integrate` of `[y, a]` (and, with shared steps, the parameters' adjoint) from the
    last output time back to the start, stepping onto every output time of every row (with
    shared steps and times per sample, onto all of them in time order); where it lands,
    `arrive` resets `y` to the forward output and adds the output's cotangent to `a`, for
    each row whose output lies there. Where the forward's `func` jumps (the knots of a
    linear or rectilinear path), so does the reverse solve's: it steps onto those stops too,
    from after, and starts afresh before them. With shared steps the solve restarts at each
    output time (its next step chosen afresh, `max_steps` per interval): the reverse solve of
    the first release, which solved each interval on its own. With per-sample steps it
    goes on with its step size, and the parameters' adjoint, a sum over the samples that
    cannot ride in a per-sample state, is the quadrature `-int a^T df/dtheta dt` over the
    solve's accepted steps afterwards (`_parameter_quadrature`): excluded from the error
    control, which the shared solve applies to it.
    """
    setting = setting_of(times, g_ys, per_sample, y0)
    groups = setting.groups
    params = list(sources) + [tf.convert_to_tensor(v) for v in variables]
    carried = [] if per_sample else params
    num_y = len(y0)
    ys = trajectory.ys  # [n, ...], or [n, batch, ...] when by rows
    # Every row's output times, the start included: [R, n].
    rows = setting.ts_rows if setting.dense else setting.stops
    by_batch = setting.by_batch
    dtype = rows.dtype
    arrive = _arrival(rows, ys, g_ys, num_y, setting.sign, by_batch)
    if by_batch and groups.shared:
        # One solve for rows of their own times: through all of them, in time order.
        later = setting.sign * tf.sort(setting.sign * tf.reshape(rows[:, 1:], [-1]))
        reverse_stops = tf.concat([tf.reverse(later, [0]), setting.stops[0, :1]], 0)[None]
    else:
        reverse_stops = tf.reverse(rows, [1])  # [G, S]
    kwargs = dict(loop_kwargs)
    jumps = kwargs.pop("jumps", None)
    if jumps is not None:
        reverse_stops, kwargs["jumps"] = _reverse_jumps(setting.stops, jumps, reverse_stops,
                                                        per_sample)

    def augmented(t, state):
        y, a = state[:num_y], state[num_y:2 * num_y]
        with tf.GradientTape() as tape:
            tape.watch(y + list(sources))
            f = func(t, y, args)
        g_y, g_s, g_v = tape.gradient(
            f, [y, list(sources), list(variables)], output_gradients=a,
            unconnected_gradients=tf.UnconnectedGradients.ZERO)
        g_p = list(g_s) + [tf.convert_to_tensor(g) for g in g_v] if carried else []
        return f + [-tf.convert_to_tensor(g) for g in list(g_y) + g_p]

    def on_land(i, landed, state):
        return arrive(groups, at_stop(reverse_stops, i), landed, state)

    def tolerance(given, forward):
        if given is not None:
            return [tf.constant(given, dtype)] * (2 * num_y + len(carried))
        smallest = tf.reduce_min(tf.stack([tf.reduce_min(x) for x in forward]))
        return forward + forward + [smallest] * len(carried)

    reverse_controller = dataclasses.replace(
        controller, rtol=tolerance(strategy.rtol, controller.rtol),
        atol=tolerance(strategy.atol, controller.atol),
        measured=2 * num_y if strategy.norm == "seminorm" else None)
    if strategy.max_steps is not None:
        kwargs["max_steps"] = strategy.max_steps
    start = list(trajectory.y_final) + [tf.zeros_like(y) for y in y0]
    start = arrive(groups, reverse_stops[:, 0], tf.ones_like(reverse_stops[:, 0], tf.bool),
                   start) + [tf.zeros_like(p) for p in carried]
    rev = integrate(solver, reverse_controller, augmented, reverse_stops, start,
                    record=per_sample, on_land=on_land, restart=not per_sample,
                    save_outputs=False, **kwargs)
    # The outputs at the start's own time (after it): the solve ends there, landing on
    # no stop after it.
    end = arrive(groups, reverse_stops[:, -1], tf.ones_like(reverse_stops[:, 0], tf.bool),
                 rev.y_final[:2 * num_y])
    a_start = end[num_y:]  # a(t0), before g_ys[0]
    if per_sample:
        g_params, quadrature_fevals = _parameter_quadrature(
            solver, func, rev.checkpoints, num_y, args, sources, variables, params)
    else:
        g_params, quadrature_fevals = rev.y_final[2 * num_y:], 0

    g_later, time_fevals = _time_gradients(func, rows, ys, g_ys, args, groups, by_batch)
    # The start: moving it with y0 fixed shifts the solution by -Phi f(t0, y0).
    t0 = setting.stops[:, 0]
    g_t0 = -group_dot(groups, a_start, func(groups.lane(t0), y0, args))  # [G]
    g_y0 = [a_n + g[0] for a_n, g in zip(a_start, g_ys)]
    if setting.dense:
        g_times = [tf.stack([g_t0, tf.zeros_like(g_t0)], 1), g_later]
    else:
        g_times = [tf.concat([g_t0[:, None], g_later], 1)]
    g_times = [tf.reduce_sum(g, 0) if t.shape.rank == 1 else g for g, t in zip(g_times, times)]
    grads = [*g_times, *g_y0, *g_params]
    # The slowest sample's counts (what the batched solve ran), plus the evaluations of the
    # quadrature, of the time gradients and at the start.
    stats = [tf.reduce_max(x) for x in rev.stats[:3]]
    fevals = stats[2] + quadrature_fevals + time_fevals + 1
    counts = (stats[0], stats[1], fevals, tf.constant(0, tf.int32),
              tf.reduce_max(rev.stats.num_forced))
    return grads, rev.status, rev.t_final, counts


def _reverse_jumps(stops, jumps, reverse_stops, per_sample):
    """`(reverse_stops, flags)`: the reverse solve's stops with the forward's jumps (the
    knots of a path whose dX/dt jumps, flagged in `jumps` like the forward's `stops`),
    which it steps onto from after and starts afresh before, as the forward does. A knot
    at an output time flags that stop (a stop of its own there would land twice, and
    `arrive` would add the output's cotangent twice); elsewhere `arrive` changes nothing."""
    is_knot = tf.broadcast_to(jumps, tf.shape(stops))
    end = tf.broadcast_to(stops[:, -1:], tf.shape(stops))
    knots = tf.where(is_knot, stops, end)
    at_output = is_knot & tf.reduce_any(
        tf.equal(knots[:, :, None], reverse_stops[:, None, :]), axis=2)
    plan, flags = with_stops(Plan(reverse_stops, None), tf.where(at_output, end, knots),
                             per_sample)
    merged = plan.stops
    merged = merged[None] if merged.shape.rank == 1 else merged
    flags = flags[None] if flags.shape.rank == 1 else flags
    nan = tf.fill(tf.shape(knots), tf.constant(float("nan"), knots.dtype))
    shared_knots = tf.where(at_output, knots, nan)
    flags |= tf.reduce_any(tf.equal(merged[:, :, None], shared_knots[:, None, :]), axis=2)
    return merged, flags


def _arrival(rows, ys, g_ys, num_y, sign, by_batch):
    """`arrive(groups, tau, apply, state) -> state`: at time `tau` (`[G]`), for the rows
    where `apply` (`[G]`) holds, `y` becomes the forward output at that time and `a`
    receives the cotangent of every output there after the start (times may repeat: each
    repeat is an output of its own). `rows`: `[R, n]` output times; `ys`, `g_ys`: `[n, ...]`
    or, by rows, `[n, batch, ...]` (padding repeats a row's last time with no cotangent)."""
    keys = sign * rows
    n = tf.shape(rows)[1]
    index = tf.range(tf.shape(rows)[0])

    def read(xs, k):
        # `tf.gather`, never `x[k]`: see `_jit`.
        if by_batch:
            return [tf.gather_nd(x, tf.stack([k, index], 1)) for x in xs]
        return [tf.gather(x, k[0]) for x in xs]

    def spread(mask, x):
        return per_row(mask, x) if by_batch else mask[0]

    def arrive(groups, tau, apply, state):
        y, a = state[:num_y], state[num_y:2 * num_y]
        if groups.shared:  # [1] -> [R]
            tau, apply = (tf.broadcast_to(v, tf.shape(rows)[:1]) for v in (tau, apply))
        at = (sign * tau)[:, None]
        lo = tf.maximum(tf.searchsorted(keys, at, side="left", out_type=tf.int32)[:, 0], 1)
        hi = tf.searchsorted(keys, at, side="right", out_type=tf.int32)[:, 0]
        count = tf.where(apply, tf.maximum(hi - lo, 0), 0)
        k = tf.minimum(lo, n - 1)
        y = [tf.where(spread(count > 0, y_n), o, y_n) for y_n, o in zip(y, read(ys, k))]

        def add(j, a):
            # The repeats of a time from the last: the order of the first release.
            k = tf.clip_by_value(lo + count - 1 - j, 0, n - 1)
            valid = j < count
            return j + 1, [a_n + tf.where(spread(valid, g), g, tf.zeros_like(g))
                           for a_n, g in zip(a, read(g_ys, k))]

        _, a = tf.while_loop(lambda j, a: j < tf.reduce_max(tf.concat([count, [0]], 0)), add,
                             (tf.constant(0, tf.int32), a))
        return y + a + state[2 * num_y:]

    return arrive


def _time_gradients(func, rows, ys, g_ys, args, groups, by_batch):
    """`[R, n - 1]`: `dL/dts[r, k] = <dL/dys[k], f(ts[r, k], ys[k])>` on row `r` for
    `k >= 1`, and how many evaluations of `func` that took. With shared steps and times
    per sample, `func` takes one time: one evaluation per row and time that is not padding
    (a repeat of the time before it)."""
    n = tf.shape(rows)[1]
    num_rows = tf.shape(rows)[0]
    one_time = by_batch and groups.shared
    by_row = Groups(shared=False)

    def column(k, g_later, fevals):
        g_k, y_k = [tf.gather(g, k) for g in g_ys], [tf.gather(y, k) for y in ys]
        t_k = tf.gather(rows, k, axis=1)
        if not one_time:
            inner = group_dot(groups, g_k, func(groups.lane(t_k), y_k, args))
            return k + 1, g_later.write(k - 1, inner), fevals + 1

        def row(b, inner, fevals):
            t_b = tf.gather(t_k, b)
            padded = tf.equal(t_b, tf.gather(tf.gather(rows, k - 1, axis=1), b))
            g_b = tf.cond(padded, lambda: tf.zeros([], rows.dtype),
                          lambda: tf.gather(group_dot(by_row, g_k, func(t_b, y_k, args)), b))
            return b + 1, inner.write(b, g_b), fevals + 1 - tf.cast(padded, tf.int32)

        _, inner, fevals = tf.while_loop(
            lambda b, *_: b < num_rows, row,
            (tf.constant(0, tf.int32), tf.TensorArray(rows.dtype, size=num_rows,
                                                      element_shape=[]), fevals))
        return k + 1, g_later.write(k - 1, inner.stack()), fevals

    _, g_later, fevals = tf.while_loop(
        lambda k, *_: k < n, column,
        (tf.constant(1, tf.int32),
         tf.TensorArray(rows.dtype, size=n - 1, element_shape=rows.shape[:1]),
         tf.constant(0, tf.int32)))
    g_later = tf.reshape(g_later.stack(), tf.stack([n - 1, num_rows]))
    return tf.transpose(g_later), fevals


def _parameter_quadrature(solver, func, cp, num_y, args, sources, variables, params):
    """`-int a^T df/dtheta dt` along a per-sample reverse solve, with its own Runge-Kutta
    weights over its recorded accepted steps: each step's stages rebuilt, one
    vector-Jacobian product per stage with the cotangent scaled by the sample's own step
    size (zero for a sample that did not step). Returns the gradients and the count of
    evaluations."""
    tableau = solver.tableau
    count = tableau.solution_stages

    def quadrature(i, g_params):
        t, dt, accepted = cp.t[i], cp.dt[i], cp.accepted[i]
        state = [x[i] for x in cp.y]
        scale = tf.where(accepted, dt, tf.zeros_like(dt))
        safe = tf.where(tf.equal(scale, 0), tf.ones_like(scale), scale)
        k = []
        for stage in range(count):
            if stage == 0:
                stage_state = state
            else:
                stage_state = _weighted_sum(state, dt, tableau.a_lower[stage - 1], k)
            t_stage = t + tableau.c[stage] * dt
            y, a = stage_state[:num_y], stage_state[num_y:]
            with tf.GradientTape() as tape:
                tape.watch(y + list(sources))
                f = func(t_stage, y, args)
            scaled = [per_row(scale, a_n) * a_n for a_n in a]
            g_y, g_s, g_v = tape.gradient(
                f, [y, list(sources), list(variables)], output_gradients=scaled,
                unconnected_gradients=tf.UnconnectedGradients.ZERO)
            k.append(f + [-tf.convert_to_tensor(g) / per_row(safe, g) for g in g_y])
            weight = tableau.b_sol[stage]
            if weight != 0.0:
                g_p = [tf.convert_to_tensor(g) for g in list(g_s) + list(g_v)]
                g_params = [x - weight * g for x, g in zip(g_params, g_p)]
        return i + 1, g_params

    _, g_params = tf.while_loop(
        lambda i, *_: i < cp.num_steps, quadrature,
        (tf.constant(0, tf.int32), [tf.zeros_like(p) for p in params]),
        parallel_iterations=1)
    return g_params, cp.num_steps * count

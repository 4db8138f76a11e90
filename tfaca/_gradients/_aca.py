"""ACA, the adaptive checkpoint adjoint (Zhuang, Dvornek, Li, Tatikonda, Papademetris &
Duncan, "Adaptive Checkpoint Adjoint Method for Gradient Estimation in Neural ODE",
ICML 2020), and its checkpoint budget.

- forward: run the loop with nothing recorded on the tape; keep, for each accepted step
  `i`, only its start `(t_i, dt_i, y_i)` (the checkpoints);
- backward, for `i = N - 1 ... 0`: add the cotangent of any stop that step `i` lands on,
  rebuild the step from `y_i` under a local `tf.GradientTape` and pull the cotangent `a`
  back through it: `a <- a^T dy_{i+1}/dy_i`, and accumulate `a^T dy_{i+1}/d(args,
  variables, t_i, dt_i)`; the local graph is dropped after each step.

The result is the exact gradient of the discrete map `y0 -> y(ts)` made of the accepted
steps, with their sizes held fixed ("discretise-then-optimise"). Within an interval
`[s_{j-1}, s_j]` between the stops, a step starts at `t_i = s_{j-1} + (fixed offset)` and
the step that lands on `s_j` has size `s_j - t_i`; that is how the gradient reaches the
start and the end. An output at `tau` inside step `i` is read from the step's
interpolant (`_outputs`); the replay of step `i` pulls its cotangent back through the
same interpolant onto `y_i`, the step's stages, `t_i`, `dt_i` and `tau`. The
interpolant's last stage, `f(t_{i+1}, y_{i+1})`, is the next step's first, which the replay
rebuilt just before (last first): its value comes from there, and the cotangent that step
`i`'s outputs send it is handed to that step's replay, computed beforehand from the outputs'
cotangents alone (`_outputs.coefficient_cotangents`). Only the last step's last stage is
evaluated on its own (`_end_stage`).

One replay serves shared and per-sample steps (an entry is then one iteration of the
loop: every group's trial from its own `(t_i, dt_i, y_i)`, of which those in
`accepted[i]` were kept; the others get a zero cotangent and keep theirs), every output
mode, and the checkpoint budget (`ACAGradient(checkpoints=K)`: at most `K` states kept,
each segment between two of them rebuilt forward before it is replayed).

Costs: memory O(N * state) for the checkpoints (O(K * state) with a budget, and at most
`_record.XLA_STATES` states by default where XLA compiles the loop) plus one
step's graph; time one replay of each accepted step (the stages `y_{i+1}` needs and
their vector-Jacobian products; with interpolated outputs, one more stage in all),
never the rejected trials. The replay also checks that each rebuilt `y_{i+1}` is the one the
forward pass accepted: a `func` that is not a function of `(t, y)` alone (it draws
random numbers, or reads state that changed) would otherwise give the gradient of
another computation than the one whose loss was taken.

Second derivatives (Hessian-vector products, gradient penalties): when a tape records
the backward pass, ACA differentiates the accepted steps rebuilt from `y0` instead of
the constant checkpoints, so the gradient is itself exactly differentiable (memory then
grows with every accepted step's graph, as backprop through the accepted steps would).
"""

import numbers
from typing import Any, NamedTuple

import tensorflow as tf

from tfaca import _events, _outputs, _record
from tfaca._gradients._base import (
    SECOND_ORDER, AbstractGradient, accumulate, check_replay, compiled, differs, dot,
    forward_solve, loop_options, reproduction_tolerance, solve_with_custom_gradient,
    sources_with, times_of,
)
from tfaca._gradients._replay import (
    add_landed, covered, jumped, onto_stops, setting_of, to_groups, to_rows,
)
from tfaca._control import StepSizeController
from tfaca._internals import could_possibly_record, in_xla_context, stop_recording
from tfaca._jit import compiles


class ACAGradient(AbstractGradient):
    """The adaptive checkpoint adjoint: exact gradients of the accepted steps (default).

    Gradients reach `y0`, `args`, every entry of `ts`, the variables that `func` reads
    (Keras weights included) and tensors it closes over. The backward pass evaluates
    `func` once per stage that the solution uses (6 for Dopri5 and Tsit5, whose seventh,
    FSAL, stage only serves the next step) per accepted step, and with interpolated
    outputs one more in all, at the end (`Stats.num_fevals_backward`).

    Args:
        checkpoints: None (default): keep every accepted step's state; where XLA
            compiles the loop (the default in a graph) and `max_steps` exceeds 256,
            at most 256 of them, as `checkpoints=256` (XLA sizes buffers statically:
            every state would be a buffer of `max_steps` states allocated on each
            call). A positive int `K`: keep at most `K` states, evenly spread; the
            replay rebuilds each segment between two kept states with one forward
            step per entry it does not keep, counted in `num_fevals_backward`. The
            gradient is the same to rounding whatever the budget.

    Checkpoints are kept only when a gradient may be asked for: a solve traced or run
    with no `tf.GradientTape` active (Keras' `predict` and `evaluate`, a served
    SavedModel, eager inference) writes none. A `tf.function` traced with no tape active
    and later differentiated by a tape around its call solves forward again in its
    backward pass to record them (one more forward solve, not counted in
    `num_fevals_backward`).

    The replay checks that it rebuilds the states the forward pass accepted (to
    `sqrt(eps)` relative): if `func` is not a deterministic function of `(t, y)` (it draws
    random numbers, or reads a variable that changed between the forward and the
    backward pass) the gradient raises (`InvalidArgumentError` in a graph) instead of
    silently belonging to another computation; under XLA, or with `throw=False`, the
    gradients are NaN instead. `ODELayer` makes Keras' random layers (Dropout, noise)
    draw once per call, so they pass; in `solve`, draw the randomness outside `func` and
    pass it in `args`.
    """

    name = "aca"
    supports_events = True

    def __init__(self, checkpoints=None):
        if checkpoints is not None and (
                not isinstance(checkpoints, numbers.Integral) or isinstance(checkpoints, bool)
                or checkpoints < 1):
            raise ValueError(
                "`checkpoints` must be None (keep every accepted step) or a positive int, "
                f"the number of states to keep. Received: checkpoints={checkpoints!r}")
        self.checkpoints = None if checkpoints is None else int(checkpoints)

    def options(self):
        return {"checkpoints": self.checkpoints}

    def solve(self, solver, controller, func, plan, y0, args, *, per_sample=False, throw=True,
              jit=False, **loop_kwargs):
        if not solver.replayable:
            raise ValueError(
                f"method={solver!r} carries more than the state from step to step (ALF "
                "carries an approximation of dy/dt), which ACA's replay does not keep: use "
                'gradient="mali" (exact for the ALF steps, no states kept), "naive" or '
                '"adjoint". Received: gradient="aca"')
        budget = self.checkpoints
        if (budget is None and loop_kwargs["max_steps"] > _record.XLA_STATES
                and (in_xla_context() or compiles(jit))):
            budget = _record.XLA_STATES
        options = loop_options(controller, dict(loop_kwargs, per_sample=per_sample))

        def forward_with(record):
            forward = forward_solve(solver, func, jit, record=record, states=budget)
            return lambda times, y0, args: forward(times, y0, args, options)

        # Checkpoints only when a tape may ask for the gradient (see the class docstring);
        # a plain graph, or a compiled loop that returns them, cannot drop them later.
        record = could_possibly_record()

        event = loop_kwargs.get("event")

        def backward(trajectory, times, y0, sources, g_ys, variables, differentiable,
                     g_event=None):
            if not record:
                with stop_recording():
                    trajectory = forward_with(True)(times, y0, args)
            if differentiable:
                f = lambda t, y: func(t, y, args)  # noqa: E731
                return _unrolled_vjp(solver, f, trajectory, times, y0, sources, g_ys, variables)
            # The `sources` that `func` closes over reach the compiled function as
            # captures, as `func` reads them, so that the tape inside watches what
            # `func` uses; the `args` as arguments.
            # The controller's fields as an argument: an implicit solver's Newton
            # iterations measure their corrections with its tolerances.
            replay = compiled(
                lambda checkpoints, times, y0, g_ys, args, jumps, events, control: _replay(
                    solver.bind(StepSizeController(**control)),
                    lambda t, y: func(t, y, args), checkpoints, times, y0,
                    sources_with(sources, args), g_ys, variables, per_sample, jumps,
                    reproduction_tolerance(times[0].dtype, func),
                    None if events is None else (*events, event.by_batch)), jit, ("replay",))
            events = None
            if event is not None:
                events = (trajectory.found.t, trajectory.found.entry, g_event)
            mismatch, grads = replay(trajectory.checkpoints, times, y0, g_ys, args,
                                     loop_kwargs.get("jumps"), events, options["controller"])
            return check_replay(mismatch, grads, throw)

        second_order = None
        if per_sample or event is not None:
            second_order = SECOND_ORDER.format(
                what="ACA with per-sample steps or an event does not support yet",
                instead='Use per_sample=False without an event, or gradient="naive".')
        elif solver.implicit:
            second_order = SECOND_ORDER.format(
                what=f"ACA through the implicit steps of method={solver!r} does not "
                     "support (its Newton matrices are held constant)",
                instead='Use gradient="naive", or an explicit method.')
        trajectory = solve_with_custom_gradient(
            forward_with(record), backward, func, times_of(plan), y0, args,
            second_order=second_order, t_shape=y0[0].shape[:1] if per_sample else (),
        )
        stats = trajectory.stats
        # Each entry replays the stages its end needs (rebuilt forward once more before,
        # with a budget), and the interpolant's last stages but the end's are the next
        # entries' first.
        stages = (len(solver.dense_weights) - 1 if plan.dense
                  else solver.tableau.solution_stages)
        replay_fevals = stats.num_steps * stages
        if budget is not None:
            replay_fevals += (_record.rebuilt_steps(stats.num_steps, budget)
                              * solver.tableau.solution_stages)
        if plan.dense:
            replay_fevals += 1  # the last step's last stage (`_end_stage`)
        if event is not None:
            # Each entry holding events rebuilds its interpolant's stages once more.
            entries = tf.sort(tf.reshape(trajectory.found.entry, [-1]))
            first = tf.concat([[True], entries[1:] != entries[:-1]], 0)[:tf.size(entries)]
            distinct = tf.reduce_sum(tf.cast(first & (entries >= 0), tf.int32))
            replay_fevals += tf.cast(distinct, replay_fevals.dtype) * (
                len(solver.dense_weights) - 1)
        return trajectory._replace(stats=stats._replace(num_fevals_backward=replay_fevals))


class _Carry(NamedTuple):
    """The replay's loop state, entry `i` about to be replayed."""

    a: Any  # per component: the cotangent of entry i's end state
    g_stops: Any
    g_sources: Any
    g_vars: Any
    g_ts: Any  # [R, n] with dense outputs, else a scalar
    mismatch: Any  # the first entry whose replay differs from the forward, or -1
    sums: Any  # dense: entry i's `_outputs.coefficient_cotangents`, else ()
    f_end: Any  # dense: f(t_{i+1}, y_{i+1}), the interpolant's last stage, else ()


def _sums_of(solver, setting, cp, i):
    """Entry `i`'s `coefficient_cotangents` (none for `i < 0`)."""
    lo, hi, t_rows, dt_rows = covered(setting, cp, tf.maximum(i, 0))
    hi = tf.where(i >= 0, hi, lo)
    return _outputs.coefficient_cotangents(setting.ts_rows, lo, hi, t_rows, dt_rows,
                                           setting.g_rows, len(solver.dense_weights[0]))


def _last_stage_cotangent(solver, setting, cp, i, sums, like):
    """The cotangent that entry `i`'s outputs send onto its interpolant's last stage,
    `f(t_{i+1}, y_{i+1})`: the next entry's first stage, which takes it (zero for `i < 0`)."""
    dt_rows = to_rows(setting, tf.gather(cp.dt, tf.maximum(i, 0)))
    last = len(solver.dense_weights) - 1
    (g,) = _outputs.stage_cotangents(solver, sums, dt_rows, like, setting.by_batch, [last])
    return g


def _event_term(solver, f, groups, events, i, t, dt, y, f0):
    """`sum <g, y(t*)>` over the events that lie in entry `i`: their states as the step's
    interpolant at the fixed event times, under the replay's tape (the stages rebuilt, the
    last one, `f(t_{i+1}, y_{i+1})`, included). `events`: `(t* [K, E], entry [K, E],
    cotangents [K, R, ...] per component, by_batch)`, `K` slots per lane."""
    event_t, entry, g_slots, by_batch = events
    here = tf.equal(entry, i)

    def term():
        lanes, num = _events.lanes_of(groups), tf.shape(event_t)[1]
        t_e, dt_e = lanes(t, num), lanes(dt, num)
        y1, k = solver.replay_stages(f, groups.lane(t), y, f0, groups.lane(dt))
        coeffs = _outputs.coefficients(solver, k + [f(groups.lane(t + dt), y1)], by_batch)
        safe = tf.where(tf.equal(dt_e, 0), tf.ones_like(dt_e), dt_e)
        theta = tf.where(here, (event_t - t_e[None]) / safe[None], tf.zeros_like(event_t))
        # By rows, each slot an output of its row: [R, K].
        rows_of = (lambda v: tf.transpose(v)) if by_batch else (lambda v: tf.transpose(v[:, :1]))
        values = _outputs.interpolate(y, coeffs, dt_e if by_batch else dt_e[:1], rows_of(theta),
                                      by_batch)
        total = tf.zeros([], t.dtype)
        for v, g in zip(values, g_slots):
            g = tf.reshape(tf.transpose(g, [1, 0] + list(range(2, g.shape.rank))), tf.shape(v))
            mask = _outputs.expand(rows_of(here), v)
            total += tf.reduce_sum(tf.where(mask, g * v, tf.zeros_like(v)))
        return total

    return tf.cond(tf.reduce_any(here), term, lambda: tf.zeros([], t.dtype))


def _replay_entry(solver, f, setting, cp, i, y, y_next, carry, sources, variables, same_state,
                  events=None):
    """Replays entry `i` (its start states `y`) under a tape and pulls the cotangent `a` of
    its end state back through it, together with the cotangents of the outputs it
    covers: a stop it landed on, or the outputs inside it, through the step's own
    interpolant (`_outputs.pullback_step`). Its end is checked against `y_next`, the
    state the forward pass accepted there.

    With dense outputs, the interpolant's last stage `f(t_{i+1}, y_{i+1})` is the next
    entry's first stage, replayed before this one: its value comes in the carry
    (`f_end`), and its cotangent was taken by that entry, which computed this entry's
    `coefficient_cotangents` for it (`sums`). This entry does the same for entry
    `i - 1`: its first stage takes the cotangent of entry `i - 1`'s last, in every group,
    whether or not the group moved in entry `i` (a group that did not keeps its state:
    the cotangent goes on to the entry that moved it).

    `events`: with an event, the lanes whose event lies in this entry send their
    cotangents through the step's interpolant too (`_event_term`)."""
    c = carry
    groups = setting.groups
    t, dt, accepted = (tf.gather(x, i) for x in (cp.t, cp.dt, cp.accepted))
    hit, j = tf.gather(cp.hit, i) & accepted, tf.gather(cp.interval, i)
    a = c.a if setting.dense else add_landed(setting, c.a, j, hit)
    # A group that did not move replays a step of size 0: its stages stay finite (a
    # rejected trial may have overflowed), so that their zero cotangents give zeros.
    dt_replay = tf.where(accepted, dt, tf.zeros_like(dt))
    jumps = setting.dense and setting.jumps is not None
    if setting.dense:
        sums_before = _sums_of(solver, setting, cp, i - 1)
        handed = _last_stage_cotangent(solver, setting, cp, i - 1, sums_before, y)
        if jumps:
            # Entry i - 1 ended at a jump: its last stage is its own (left of the jump),
            # not this entry's first, and took its cotangent itself.
            before = jumped(setting, cp, i - 1)
            handed = [tf.where(groups.spread(before, h), tf.zeros_like(h), h) for h in handed]
    with tf.GradientTape() as tape:
        tape.watch([t, dt_replay] + list(y) + list(sources))
        f0 = f(groups.lane(t), y)
        if not setting.dense:
            y1 = solver.replay_step(f, groups.lane(t), y, f0, groups.lane(dt_replay))
        else:
            y1, k = solver.replay_stages(f, groups.lane(t), y, f0, groups.lane(dt_replay))
            f_end = list(c.f_end)
            if jumps:
                # This entry ends at a jump: its interpolant's last stage is f at its own
                # end, left of the jump, where the next entry starts right of it.
                ends_at_jump = jumped(setting, cp, i)
                f_last = tf.cond(
                    tf.reduce_any(ends_at_jump),
                    lambda: list(f(groups.lane(t + dt_replay), y1)),
                    lambda: [tf.zeros_like(x) for x in c.f_end])
                f_end = groups.select(ends_at_jump, f_last, f_end)
        if events is not None:
            event_term = _event_term(solver, f, groups, events, i, t, dt_replay, y, f0)
    a_in = [tf.where(groups.spread(accepted, a_n), a_n, tf.zeros_like(a_n)) for a_n in a]
    targets, cotangents = list(y1), a_in
    if events is not None:
        targets.append(event_term)
        cotangents.append(tf.ones_like(event_term))
    g_ts = c.g_ts
    if setting.dense:
        lo, hi, t_rows, dt_rows = covered(setting, cp, i)
        pulled = _outputs.pullback_step(solver, setting.ts_rows, lo, hi, t_rows, dt_rows,
                                        k + [f_end], setting.g_rows, g_ts,
                                        setting.by_batch, sums=c.sums)
        g_stages = pulled.g_stages[:-1]  # the last stage's went to entry i + 1
        g_stages[0] = [g + h for g, h in zip(g_stages[0], handed)]
        targets += [x for stage in k for x in stage]
        cotangents += [x for stage in g_stages for x in stage]
        if jumps:
            targets += f_last
            cotangents += [tf.where(groups.spread(ends_at_jump, g), g, tf.zeros_like(g))
                           for g in pulled.g_stages[-1]]
        g_ts = pulled.g_ts
    g_t, g_dt, g_y, g_s, g_v = tape.gradient(
        targets, [t, dt_replay, list(y), list(sources), list(variables)],
        output_gradients=cotangents, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    g_y = [tf.convert_to_tensor(x) for x in g_y]
    if setting.dense:
        g_y = [x + p for x, p in zip(g_y, pulled.g_y)]
        g_t += to_groups(setting, pulled.g_t)
        g_dt += to_groups(setting, pulled.g_dt)
        # A group that did not move in this entry got only the handed cotangent, on
        # this entry's start, which is where it stays: added to its `a`.
        a = [tf.where(groups.spread(accepted, g), g, a_n + g) for g, a_n in zip(g_y, a)]
        g_t_stops = g_t
    else:
        a = groups.select(accepted, g_y, a)
        g_t_stops = tf.where(accepted, g_t, tf.zeros_like(g_t))
    g_stops = onto_stops(setting, c.g_stops, j, hit, g_t_stops, g_dt)
    rebuilt = groups.select(accepted, y1, y_next)
    mismatch = tf.where(differs(rebuilt, y_next, same_state) & (c.mismatch < 0), i, c.mismatch)
    return _Carry(
        a=a, g_stops=g_stops,
        g_sources=accumulate(c.g_sources, g_s),
        g_vars=accumulate(c.g_vars, g_v),
        g_ts=g_ts, mismatch=mismatch,
        sums=sums_before if setting.dense else (), f_end=f0 if setting.dense else ())


def _end_stage(solver, f, setting, cp, y_end, carry, sources, variables):
    """With dense outputs, before the replay: the last entry's last stage, `f(t_n, y_n)`
    at the end of the solve, which no entry replays; evaluated under a tape with the
    cotangent its outputs send it (every other entry's comes with the next entry's first
    stage). Its time is `t_final`, the start of the record's last entry `n`."""
    n, groups = cp.num_steps, setting.groups
    sums = _sums_of(solver, setting, cp, n - 1)
    g_last = _last_stage_cotangent(solver, setting, cp, n - 1, sums, y_end)
    t_end = tf.gather(cp.t, n)
    with tf.GradientTape() as tape:
        tape.watch([t_end] + list(y_end) + list(sources))
        f_end = f(groups.lane(t_end), y_end)
    g_t, g_y, g_s, g_v = tape.gradient(
        f_end, [t_end, list(y_end), list(sources), list(variables)], output_gradients=g_last,
        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    g_stops = onto_stops(setting, carry.g_stops, tf.gather(cp.interval, n),
                         tf.zeros_like(g_t, tf.bool), g_t, tf.zeros_like(g_t))
    return carry._replace(
        a=[a + tf.convert_to_tensor(g) for a, g in zip(carry.a, g_y)], g_stops=g_stops,
        g_sources=accumulate(carry.g_sources, g_s),
        g_vars=accumulate(carry.g_vars, g_v),
        sums=sums, f_end=[tf.convert_to_tensor(x) for x in f_end])


def _replay(solver, f, checkpoints, times, y0, sources, g_ys, variables, per_sample,
            jumps, same_state, events=None):
    """ACA's backward pass: every accepted step replayed once, last first (see the module
    docstring). With all states kept, each entry's start is its checkpoint. With a
    budget (`cp.stride`), for each segment of `stride` entries, last first, its start
    states are rebuilt forward from its checkpoint with the recorded step sizes (one
    forward step each), then replayed: the same gradient to rounding, memory `K`
    checkpoints plus one segment's states.

    Returns `(mismatch, grads)`: the first entry whose replay did not rebuild the state
    the forward pass accepted to `same_state` relative (`reproduction_tolerance`; -1 if
    none; `check_replay` reports it) and the gradients
    of the times, `y0`, the sources and the variables, as one flat list. `events`: an
    event's `(t*, entry, cotangents of its states, by_batch)` (`_event_term`), or None.
    """
    cp = checkpoints
    setting = setting_of(times, g_ys, per_sample, y0, jumps)
    n = cp.num_steps
    budgeted = not isinstance(cp.stride, tuple)
    carry = _Carry(
        a=[tf.zeros_like(y) for y in y0], g_stops=tf.zeros_like(setting.stops),
        g_sources=[tf.zeros_like(x) for x in sources], g_vars=[tf.zeros_like(v) for v in variables],
        g_ts=tf.zeros_like(setting.ts_rows) if setting.dense else tf.zeros([]),
        mismatch=tf.constant(-1, tf.int32), sums=(), f_end=())
    if setting.dense:
        y_end = list(cp.y_end) if budgeted else [tf.gather(y, n) for y in cp.y]
        carry = _end_stage(solver, f, setting, cp, y_end, carry, sources, variables)

    def replay(i, y, y_next, carry):
        return _replay_entry(solver, f, setting, cp, i, y, y_next, carry, sources, variables,
                             same_state, events)

    if not budgeted:
        # parallel_iterations=1: each entry's replay does not depend on the cotangent, so
        # TensorFlow would otherwise run up to 10 replays ahead and hold their graphs at
        # once; one at a time keeps ACA's memory at one step's graph (XLA ignores it).
        state_of = lambda i: [tf.gather(y, i) for y in cp.y]  # noqa: E731
        carry = tf.while_loop(
            lambda i, _: i >= 0, lambda i, c: (i - 1, replay(i, state_of(i), state_of(i + 1), c)),
            (n - 1, carry), parallel_iterations=1)[1]
    else:
        carry = _replay_segments(solver, f, cp, setting.groups, replay, carry)
    stops = times[0]
    g_stops = tf.reduce_sum(carry.g_stops, axis=0) if stops.shape.rank == 1 else carry.g_stops
    g_times = [g_stops]
    if setting.dense:
        g_later = carry.g_ts[:, 1:]
        g_times.append(tf.reduce_sum(g_later, axis=0) if times[1].shape.rank == 1 else g_later)
    g_y0 = [a_n + g[0] for a_n, g in zip(carry.a, g_ys)]
    return carry.mismatch, [*g_times, *g_y0, *carry.g_sources, *carry.g_vars]


def _replay_segments(solver, f, cp, groups, replay, carry):
    """The budgeted replay: entry `i` lies in segment `m = i // stride`, entries
    `[m stride, (m + 1) stride)`. One loop over the entries, last first: at a segment's
    last entry, the segment's states are rebuilt from checkpoint `m` into one array (one
    forward step per entry but the last, whose end is the next checkpoint or the end of
    the solve); every entry reads its start and end there and is replayed
    (`replay(i, y, y_next, carry)`). With stride 1 (a solve of no more steps than the
    budget) nothing is rebuilt. One loop, not a loop over segments around a loop over
    their entries: XLA's nested loops cost ~0.1-0.3 ms per segment here (2-3 ms of a
    12-step solve with 1,000 outputs)."""
    n, stride = cp.num_steps, cp.stride
    num_segments = (n + stride - 1) // stride
    num_slots = tf.shape(cp.y[0])[0]
    if in_xla_context():
        # Static buffers: a segment is at most `stride < 2 max_steps / K` entries, and
        # never more than `max_steps` (under XLA the `K` slots come with the one that
        # took the writes that kept nothing); and one more entry, its end.
        max_steps, budget = cp.t.shape[0] - 1, cp.y[0].shape[0] - 1
        spare = min(max_steps, -(-2 * max_steps // budget)) + 1
    else:
        spare = stride + 1  # past the segment's entries and its end: a growing array
    # A segment's states, and a spare entry that takes the writes of the entries that
    # rebuild nothing (no `tf.cond`: XLA would copy the arrays through it every entry).
    segment_array = lambda y: tf.TensorArray(  # noqa: E731
        y.dtype, size=spare + 1 if in_xla_context() else 0, dynamic_size=not in_xla_context(),
        element_shape=y.shape, clear_after_read=False)

    def body(i, tas, carry):
        m = i // stride
        first = m * stride
        last = tf.minimum(first + stride, n)
        refill = tf.equal(i, last - 1)

        def rebuild(j, y, tas):
            tas = [ta.write(j - first, y_n) for ta, y_n in zip(tas, y)]
            t, dt, accepted = (groups.lane(tf.gather(x, j)) for x in (cp.t, cp.dt, cp.accepted))
            y1, _, _ = solver.step(f, t, y, f(t, y), dt, solution_only=True)
            return j + 1, groups.select(groups.grouped(accepted), y1, y), tas

        start = [tf.gather(y_n, m) for y_n in cp.y]
        _, y, tas = tf.while_loop(lambda j, *_: refill & (j < last - 1), rebuild,
                                  (first, start, tas), parallel_iterations=1)
        # The state the forward accepted after the segment: the next checkpoint, or the end.
        after = [tf.where(m + 1 < num_segments, tf.gather(y_n, tf.minimum(m + 1, num_slots - 1)), e)
                 for y_n, e in zip(cp.y, cp.y_end)]
        at = lambda k: tf.where(refill, k, spare)  # noqa: E731
        tas = [ta.write(at(last - 1 - first), y_n) for ta, y_n in zip(tas, y)]
        tas = [ta.write(at(last - first), y_n) for ta, y_n in zip(tas, after)]
        carry = replay(i, [ta.read(i - first) for ta in tas],
                       [ta.read(i + 1 - first) for ta in tas], carry)
        return i - 1, tas, carry

    # Written before the loop: XLA cannot use an unwritten array of unknown static shape
    # (a batch of unknown size) there.
    arrays = [segment_array(e).write(0, e) for e in cp.y_end]
    # parallel_iterations=1: see `_replay`.
    return tf.while_loop(lambda i, *_: i >= 0, body, (n - 1, arrays, carry),
                         parallel_iterations=1)[2]


def _unrolled_vjp(solver, f, trajectory, times, y0, sources, g_ys, variables):
    """ACA's gradient as backprop through the accepted steps rebuilt from `y0` (shared
    steps).

    Used when a tape records the backward pass: every rebuilt state (and output) is then a
    function of `y0`, the times, the sources and the variables, so the gradient returned
    is itself exactly differentiable (the replay's checkpoints would be constants). Same
    value as `_replay` to rounding; memory: every accepted step's graph.
    """
    cp = trajectory.checkpoints
    with tf.GradientTape() as tape:
        tape.watch([*times, *y0, *sources])
        setting = setting_of(times, g_ys, False, y0)
        stops = setting.stops[0]

        def step(i, y, total):
            # The step's start as a function of the stops (its offset in the interval is
            # fixed); the landing step's size follows stops[j].
            t_rec, dt_rec, j, hit = (tf.gather(x, i)[0] for x in (cp.t, cp.dt, cp.interval,
                                                                   cp.hit))
            before = tf.gather(stops, j - 1)
            t = before + tf.stop_gradient(t_rec - before)
            dt = tf.where(hit, tf.gather(stops, j) - t, dt_rec)
            if not setting.dense:
                y1, _, _ = solver.step(f, t, y, f(t, y), dt, solution_only=True)
                landed = dot([tf.gather(g, j) for g in g_ys], y1)
                return i + 1, y1, total + tf.where(hit, landed, tf.zeros_like(landed))
            y1, k = solver.replay_stages(f, t, y, f(t, y), dt)
            stages = k + [f(t + dt, y1)]
            lo, hi, _, _ = covered(setting, cp, i)
            total += _outputs.dot_covered(
                solver, setting.ts_rows, lo, hi, to_rows(setting, t[None]),
                to_rows(setting, dt[None]), y, stages, setting.g_rows, setting.by_batch)
            return i + 1, y1, total

        # XLA differentiates a loop only with a static bound: the buffers' size.
        _, _, total = tf.while_loop(
            lambda i, *_: i < cp.num_steps, step,
            (tf.constant(0, tf.int32), list(y0), dot([g[0] for g in g_ys], y0)),
            maximum_iterations=cp.t.shape[0])
    grads = tape.gradient(total, [*times, *y0, *sources, *variables],
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [tf.convert_to_tensor(g) for g in grads]

"""The one integration loop, shared by every gradient strategy and both kinds of stepping.

Algorithm (Hairer, Nørsett & Wanner I, II.4; Zhuang et al., ICML 2020, Algorithm 1):
start at the first stop with `f0 = func(t0, y0)` and a first step `dt`; repeat

1. aim at the next *stop*, the next time to step onto exactly: if `dt` would reach or
   pass it, shorten the step to land on it. The stops are the output times
   (`interpolate=False`), or only the start and the end (`_outputs.plan`);
2. take a trial step of the embedded pair and its error ratio;
3. accept it if the ratio is <= 1, by *selection* (`where(accept, new, old)`): a
   rejected trial changes nothing and, under ACA, leaves nothing behind;
4. save the outputs the accepted step covers: a stop it landed on is its end state; an
   output time inside it is read from the step's own continuous extension (Dopri5's and
   Tsit5's fourth-order one, cubic Hermite for the others), evaluated there from the
   step's stages, in an inner loop over those outputs (diffrax's `SaveAt(ts=...)`);
5. propose the next `dt` from the error ratio;
6. with an event, look for its condition's crossings on the accepted step's interpolant
   (`_events.detect`), and end the groups whose terminal event has come.

*Groups.* The stepping state (time, step size, error ratio, acceptance, status, the
next stop) carries a leading axis of `G` groups, broadcast over the state: `G = 1`
when the whole state shares one step size, `G = batch` with per-sample steps
(`per_sample=True`, every state component's leading axis being the batch), where each
sample steps, lands, saves and stops as if it were alone and `func` receives `t` of
shape `[batch]`. A group that is done takes steps of size 0 until every group is. Output
times have their own leading axis of `R` rows, 1 for times shared by the batch and
`batch` for times per sample; either stepping serves either kind of times.

The loop is one `tf.while_loop` of at most `max_steps` iterations (trials). With
`record=True` it also keeps, for each iteration in which some group accepted its trial,
the step's start `(t_i, dt_i, y_i)` and where it lies among the stops: the checkpoints
ACA's backward pass replays, step by step, pulling back the cotangents of the outputs
saved inside each step through the same interpolant. Buffers are written at the index
of the next accepted step on every trial; a rejected trial's entry is overwritten by the
retry, so only accepted steps survive.

What `max_steps` costs. Outside XLA (eagerly, in a plain `tf.function`) nothing is
sized by it: the checkpoint buffers grow with the steps taken. Under XLA every buffer
needs a static shape: a call that kept every state would allocate and zero-fill
`max_steps x state` however few steps it takes. So `states` bounds them: ACA's
checkpoint budget `K` (by default `_record.XLA_STATES` under XLA), MALI's none; the
state buffer has `K + 1` entries, or none, and only the steps' scalars (20 bytes each)
are sized by `max_steps`. The outputs
never are: their buffer is `len(ts)` states, written as the steps cover them.
(`benchmarks/max_steps_xla.py`, `benchmarks/outputs.py` measure both.)
"""

import functools
from typing import Any, NamedTuple

import tensorflow as tf

from tfaca import _events, _outputs, _record
from tfaca._internals import in_xla_context
from tfaca._solution import SolveError, Stats, Status, failed
from tfaca._solvers import per_row

_RUNNING = -1


class Trajectory(NamedTuple):
    ys: Any  # flat list of [len(ts), ...] tensors ([len(ts), batch, ...] per sample)
    stats: Stats
    status: Any
    t_final: Any
    checkpoints: Any  # Checkpoints or None
    y_final: Any = ()  # flat list: the state at t_final
    found: Any = ()  # with an event: its `_events.Found`


class Groups(NamedTuple):
    """How the stepping state's group axis meets the state: `shared` (`G = 1`) or one group
    per sample of the batch (the leading axis of every state component)."""

    shared: bool

    def lane(self, v):
        """A `[G]` tensor as the solver, the controller and `func` take it: a scalar when
        shared, else as it is."""
        return v[0] if self.shared else v

    def grouped(self, v):
        """The inverse of `lane`: `[G]`."""
        return tf.reshape(v, [-1]) if self.shared else v

    def spread(self, v, x):
        """A `[G]` tensor laid out to broadcast over the state component `x`."""
        return v[0] if self.shared else per_row(v, x)

    def select(self, accept, new, old):
        return [tf.where(self.spread(accept, a), a, b) for a, b in zip(new, old)]

    def all_finite(self, xs):
        """`[G]`: whether every element of each group's part of `xs` is finite."""
        out = tf.constant(True)
        for x in xs:
            finite = tf.math.is_finite(x)
            axes = list(range(0 if self.shared else 1, x.shape.rank))
            out &= tf.reduce_all(finite, axis=axes) if axes else finite
        return self.grouped(out) if self.shared else out


class _State(NamedTuple):
    t: Any  # [G], as the fields below but y, f, ys, saves, record
    dt: Any
    y: Any
    f: Any
    i_out: Any  # the next stop
    k: Any  # accepted steps since the last stop (fixed-step grid index)
    num_trials: Any
    num_steps: Any
    num_rejected: Any
    num_forced: Any  # trials at `min_step` accepted by force
    num_fevals: Any
    status: Any
    outputs: Any  # the output buffer's TensorArrays (`_outputs.Buffer`)
    saved: Any  # [R]: outputs saved so far per row (interpolated outputs)
    record: Any  # dict of the checkpoint buffers, or {}
    entries: Any  # scalar: checkpoint entries written (iterations that accepted)
    found: Any  # with an event, its `_events.Found`, else ()
    history: Any  # a PID controller's last accepted error ratios ([2, G]), else ()
    retry: Any  # [G], whether the last trial was rejected (`solver.hold_after_reject`), or ()


def graph_assert(condition, data, summarize=3):
    """An assertion op for a graph: `tf.debugging.Assert` without its guard, a `tf.cond`
    whose branch function costs a call on every run (~0.1 ms of a fast solve). The data
    are a few small tensors; the op formats them only when `condition` fails."""
    data = [tf.convert_to_tensor(x) for x in data]
    return tf.raw_ops.Assert(condition=condition, data=data, summarize=summarize)


def raise_on_failure(status, t_final, outputs, context):
    """Eagerly raise `SolveError`; in graphs make `outputs` depend on an assertion; under
    XLA, which has no run-time assertions, return them as they are (`status` tells).

    `context` (a string) is appended to the message, e.g. the `max_steps` in force.
    With per-sample steps `status` and `t_final` are `[batch]`: the first sample that
    failed is reported, by its index.
    """
    where = ""
    if status.shape.rank == 1:
        # Padded with a success, so that an empty batch (a replica's) reports one.
        status = tf.concat([status, [0]], 0)
        t_final = tf.concat([t_final, tf.zeros([1], t_final.dtype)], 0)
        sample = tf.argmax(tf.cast(failed(status), tf.int32), output_type=tf.int32)
        status, t_final = tf.gather(status, sample), tf.gather(t_final, sample)
        where = "sample"
    if hasattr(status, "numpy"):
        code = Status(int(status.numpy()))
        if code.failed:
            at = f"sample {int(sample)}, " if where else ""
            raise SolveError(
                f"{code.message} (status {code.name}, {at}t={float(t_final)}, {context})")
        return outputs
    if in_xla_context():
        return outputs
    messages = tf.constant([f"{c.message} (status {c.name})" for c in Status])
    data = [messages[status]] + (["sample", sample] if where else []) + ["t =", t_final, context]
    check = graph_assert(tf.logical_not(failed(status)), data)
    with tf.control_dependencies([check]):
        return [tf.identity(x) for x in outputs]


def _runs(stops):
    """Runs of equal consecutive times in each row of `stops` (`[G, S]`): `(first, after)`,
    int32 `[G, S]`: the index of the first time of each entry's run, and the index just
    past its run. Repeated stops are one stop (padding of times per sample; all of a
    solve's stops when it has nothing to step)."""
    moves = tf.cast(tf.not_equal(stops[:, 1:], stops[:, :-1]), tf.int32)
    run = tf.cumsum(tf.concat([tf.zeros_like(stops[:, :1], tf.int32), moves], axis=1), axis=1)
    first = tf.searchsorted(run, run, side="left", out_type=tf.int32)
    after = tf.searchsorted(run, run, side="right", out_type=tf.int32)
    return first, after


class _Saves(NamedTuple):
    """The interpolated outputs of a solve, as the loop reads them."""

    ts: Any  # [R, n] output times, the start included
    keys: Any  # sign * ts, non-decreasing per row
    sign: Any
    by_batch: bool


def _save_step(solver, saves, groups, outputs, lo, hi, t, dt, y, stages):
    """Writes the outputs `lo <= k < hi` of each row (`[R]`) from the step `(t, dt, y)`
    (`[G]` times) with stages `stages`: the chunk loop over the outputs it covers."""
    # Broadcast by adding zeros shaped like a loop variable: a shape the loop captured would
    # not be a compile-time constant in XLA's gradient of the loop (the naive gradient).
    spread = tf.zeros(tf.shape(lo), t.dtype)
    t_rows = t + spread if groups.shared else t
    # A group that is done steps by 0 and covers nothing; its theta is never used, but
    # must not be 0/0, which backpropagation (the naive gradient) would turn into NaN.
    dt = tf.where(tf.equal(dt, 0), tf.ones_like(dt), dt)
    dt_rows = dt + spread if groups.shared else dt

    coeffs = _outputs.coefficients(solver, stages, saves.by_batch)

    def chunk(covered, arrays):
        values = _outputs.interpolate(y, coeffs, dt_rows, covered.theta, saves.by_batch)
        return (_outputs.write(outputs._replace(arrays=arrays), covered.index, covered.valid,
                               values).arrays,)

    (arrays,) = _outputs.for_covered(saves.ts, lo, hi, t_rows, dt_rows, chunk, (outputs.arrays,))
    return outputs._replace(arrays=arrays)


def _few_ulps(dtype):
    finfo = tf.experimental.numpy.finfo(dtype.as_numpy_dtype)
    eps, tiny = float(finfo.eps), float(finfo.tiny)

    def few_ulps(magnitude):
        """What "the same time" means near times of this magnitude: 4 ulps of it.

        Relative, so that short time scales work in float32 (ulps of max(|t|, 1) made
        every step under ~5e-7 look like no step); floored at the smallest normal
        number, below which CPUs may flush a step to zero.
        """
        return tf.maximum(4.0 * eps * magnitude, tiny)

    return few_ulps


def _aim(s, stop, adaptive, few_ulps, dtype, jump_at=None, sign=None):
    """The trial's end `t1` and size `dt`, and whether it lands on the next stop (`[G]`).
    A stop where the derivative jumps (`jump_at`) is aimed at one ulp short of it."""
    t_target = stop(s.i_out)
    if jump_at is not None:
        t_target = tf.where(jump_at(s.i_out), tf.math.nextafter(t_target, t_target - sign),
                            t_target)
    # Land on the stop when the step reaches it or falls short by a few ulps: a sliver
    # step would waste a step and, adaptively, spoil the next step size. "Few ulps" of
    # the times being compared: the rounding of `t + dt` against the stop is relative to
    # the larger of them.
    if adaptive:
        slack = few_ulps(tf.maximum(tf.abs(s.t), tf.abs(t_target)))
        remaining = t_target - s.t
        hit = tf.abs(s.dt) >= tf.abs(remaining) - slack
        return tf.where(hit, t_target, s.t + s.dt), tf.where(hit, remaining, s.dt), hit
    # Fixed steps sit on the grid t_start + k * step_size of their interval, so rounding
    # does not accumulate over many steps. Distances from t_start are compared: their
    # rounding is relative to the larger end of the interval.
    t_start = stop(s.i_out - 1)
    slack = few_ulps(tf.maximum(tf.abs(t_start), tf.abs(t_target)))
    t_grid = t_start + tf.cast(s.k + 1, dtype) * s.dt
    hit = tf.abs(t_grid - t_start) >= tf.abs(t_target - t_start) - slack
    t1 = tf.where(hit, t_target, t_grid)
    return t1, t1 - s.t, hit


def integrate(solver, controller, func, stops, y0, *, step_size, first_step, max_steps, record,
              per_sample=False, saves=None, on_land=None, restart=False, save_outputs=True,
              states=None, jumps=None, event=None):
    """Integrates `func` from the first stop through every stop, stepping onto each.

    Args:
        solver: an `AbstractSolver`.
        controller: a `StepSizeController` (unused with a fixed `step_size`); built with
            `per_sample=True` for per-sample steps.
        func: `func(t, y) -> dy/dt` on flat lists of tensors.
        stops: the times to step onto: `[S]` monotone; with `per_sample`, also
            `[batch, S]`: each sample's own (monotone, possibly repeating) stops.
        y0: flat list of state tensors at the first stop.
        step_size: `None` for adaptive stepping, else the fixed step size.
        first_step: `None` to select it automatically, else the first trial step size.
        max_steps: Python int, the largest number of trials (iterations).
        record: Python bool, whether to keep the ACA checkpoints.
        per_sample: Python bool: one group per sample (the leading axis of every state
            component), see the module docstring. Times, statistics and status are
            then `[batch]`, and the outputs `[n, batch, ...]`.
        saves: None: the outputs are the states at the stops. Else the output times by
            rows, the first being the start (`_outputs.Rows`, one row per sample with
            `per_sample`): each is read from the accepted step that covers it. They
            must lie between the first and the last stop (of its sample).
        on_land: `on_land(i, landed, y) -> y`, called after each trial with `i` (`[G]`,
            the index of each group's next stop), `landed` (`[G]` bool, the groups whose
            accepted step ended on it and go on past it: never at their last stop) and
            the accepted states; returns the states to go on from (the adjoint's reverse
            solve resets the state and adds an output's cotangent there). The landed
            groups' derivative is evaluated again at the new state.
        restart: with `on_land`, a landed group also starts afresh: its next step is
            chosen as the first one was, and `max_steps` bounds each interval between
            stops rather than the whole solve (not with `record`).
        save_outputs: False: keep no outputs (`ys` is empty), only where the solve ended.
        states: with `record`, which accepted states to keep: `None`, every one; `0`,
            none (the step's scalars only); a Python int `K >= 1`, at most `K`, evenly
            spread by thinning: the start of every `stride`-th entry is kept, and when
            the `K` slots are full, every other one is dropped and the stride doubles
            (`stride < 2 * num_steps / K`).
        jumps: None, or bool like `stops`: the stops where `func` jumps (the knots of a
            path whose derivative jumps; never the first or the last stop). The step that
            lands on such a stop ends one ulp before it, the next starts one ulp after it
            (diffrax's `jump_ts`), and `func` is evaluated afresh there: no step, nor its
            interpolant, straddles the jump, and a left-continuous `func` is evaluated on
            the side of each step. An output at the stop itself is read from the step
            before it.
        event: None, or an `_events.Detector` (its args bound): after each accepted
            step its conditions are checked on the step's interpolant; a lane whose
            condition crosses records its event (`Trajectory.found`), and a group whose
            lanes' terminal events have all come ends with `Status.EVENT` (see
            `_events`).

    Returns:
        A `Trajectory`; its `checkpoints` are set when `record`.
    """
    groups = Groups(shared=not per_sample)
    solver = solver.bind(controller)
    dtype = stops.dtype
    stops = stops[None] if stops.shape.rank == 1 else stops
    num_stops = tf.shape(stops)[1]
    if per_sample:
        stops = tf.broadcast_to(stops, tf.stack([tf.shape(y0[0])[0], num_stops]))
    t0 = stops[:, 0]
    # One direction for every group (the caller checked it); 0 when no group's stops
    # leave the start (all padding): nothing is stepped.
    sign = tf.sign(tf.reduce_sum(stops[:, -1] - stops[:, 0]))
    first, after = _runs(stops)

    stop = functools.partial(_outputs.at_stop, stops)
    # The first stop after the run of equal stops that `i` starts.
    next_stop = functools.partial(_outputs.at_stop, after)

    jump_at = None
    if jumps is not None:
        jumps = tf.broadcast_to(jumps[None] if jumps.shape.rank == 1 else jumps, tf.shape(stops))
        jump_at = functools.partial(_outputs.at_stop, jumps)

    adaptive = step_size is None
    # Whether choosing a first step evaluates `func` (once).
    selects = adaptive and first_step is None

    def initial_step(t, y, f):
        """The first trial step (`[G]`) of a solve from `(t, y)`, `f` its derivative."""
        if not adaptive:
            return sign * step_size * tf.ones_like(t)
        if first_step is not None:
            return controller.clip(sign * first_step * tf.ones_like(t))
        return groups.grouped(controller.first_step(
            func, groups.lane(t), y, f, solver.error_order, sign))

    if restart and record:
        raise ValueError("integrate: `restart` keeps no checkpoints (`record` must be False)")
    f0 = func(groups.lane(t0), y0)
    num_fevals = tf.ones_like(t0, tf.int32) + int(selects)
    dt0 = initial_step(t0, y0, f0)

    if not save_outputs:
        buffer, save, saved = None, None, tf.zeros([0], tf.int32)
    elif saves is None:
        # The outputs are the stops: rows are the groups.
        buffer = _outputs.new_buffer(y0, num_stops, tf.shape(t0)[0], per_sample,
                                     start=tf.ones_like(t0, tf.int32))
        save = None
        saved = tf.zeros([0], tf.int32)
    else:
        ts_rows, by_batch = saves
        save = _Saves(ts=ts_rows, keys=sign * ts_rows, sign=sign, by_batch=by_batch)
        t0_rows = tf.broadcast_to(t0, tf.shape(ts_rows)[:1]) if groups.shared else t0
        saved = _outputs.count_through(save.keys, t0_rows, sign)
        buffer = _outputs.new_buffer(y0, tf.shape(ts_rows)[1], tf.shape(ts_rows)[0], by_batch,
                                     start=saved)

    recorded = _record.new(dtype, max_steps, t0, y0, states) if record else {}
    if record and states == 0 and jump_at is not None:
        # MALI's inverse steps need the derivative each jump's fresh one replaced.
        recorded["f_jump"] = _record.new_jumps(f0, jumps)
    few_ulps = _few_ulps(dtype)
    restarts = (initial_step, selects) if restart and on_land is not None else None
    found = ()
    if event is not None:
        found = _events.start(event.values(groups.lane(t0), y0), t0, y0, event.by_batch,
                              _events.lanes_of(groups), event.slots)
    body = _body(solver, controller, func, groups, stop, next_stop, few_ulps, adaptive, save,
                 buffer, on_land, restarts, states, max_steps, num_stops, dtype, jump_at, sign,
                 event, jumps)
    zero = tf.zeros_like(t0, tf.int32)
    # Non-finite times (XLA's report of times that are not monotone, see `_odeint`) fail
    # at once too, rather than after `max_steps` trials that cannot advance.
    f0_finite = groups.all_finite(f0) & tf.reduce_all(tf.math.is_finite(stops))
    # A solve whose stops all repeat the start (all padding) is done before any step.
    i_out = next_stop(zero)
    state = _State(
        t=t0, dt=dt0, y=list(y0), f=list(f0), i_out=i_out, k=zero, num_trials=zero,
        num_steps=zero, num_rejected=zero, num_forced=zero, num_fevals=num_fevals,
        status=tf.where(i_out >= num_stops, int(Status.SUCCESS),
                        tf.where(f0_finite, _RUNNING, int(Status.NONFINITE))),
        outputs=() if buffer is None else buffer.arrays, saved=saved, record=recorded,
        entries=tf.constant(0, tf.int32), found=found,
        history=controller.history(t0) if adaptive else (),
        retry=tf.zeros_like(t0, tf.bool) if adaptive and solver.hold_after_reject else (),
    )
    # With restarts, `max_steps` trials per interval (the status stops each one).
    bound = max_steps * tf.maximum(num_stops - 1, 1) if restart else max_steps
    (state,) = tf.while_loop(lambda s: tf.reduce_any(s.status == _RUNNING), body, (state,),
                             maximum_iterations=bound)
    ys = ([] if buffer is None
          else _read_outputs(state, buffer._replace(arrays=state.outputs), save, first, y0))
    checkpoints = _record.checkpoints(state, y0, states, dtype) if record else None
    lane = groups.lane
    status = tf.where(state.status == _RUNNING, int(Status.MAX_STEPS_REACHED), state.status)
    return Trajectory(
        ys=ys,
        stats=Stats(num_steps=lane(state.num_steps), num_rejected=lane(state.num_rejected),
                    num_fevals=lane(state.num_fevals), num_forced=lane(state.num_forced)),
        status=lane(status), t_final=lane(state.t), checkpoints=checkpoints,
        y_final=list(state.y), found=state.found,
    )


def _read_outputs(state, buffer, save, first, y0):
    """The outputs from the loop's buffer; NaN where the solve did not reach them (a failed
    solve), never a stale state. A stop that repeats the one before it is the same output:
    the state written at the first of its run."""
    ys = _outputs.read(buffer, y0)
    if save is not None:
        return ys  # an output no step covered is still the buffer's NaN
    # Output k of row r is the state written at first[r, k], the first of its run; the
    # loop writes every trial onto the next stop, kept only once a step lands there.
    reached = tf.transpose(first) < state.i_out[None, :]  # [S, R]
    perm = lambda y: [1, 0] + list(range(2, y.shape.rank))  # noqa: E731
    by_rows = [y if buffer.by_batch else y[:, None] for y in ys]
    ys = [tf.transpose(tf.gather(tf.transpose(y, perm(y)), first, batch_dims=1), perm(y))
          for y in by_rows]
    out = []
    for y in ys:
        y = tf.where(_outputs.expand(reached, y), y, tf.constant(float("nan"), y.dtype))
        out.append(y if buffer.by_batch else y[:, 0])
    return out


def _body(solver, controller, func, groups, stop, next_stop, few_ulps, adaptive, save, buffer,
          on_land, restarts, states, max_steps, num_stops, dtype, jump_at, sign, event, jumps):
    """The loop's body: one trial for every group that is still running. `restarts`:
    `(initial_step, selects)` with `integrate(restart=True)`, else None; `jump_at(i)`:
    whether stop `i` is a jump (`integrate`'s `jumps`, `[G, S]` here), or None."""
    lane, fsal = groups.lane, solver.fsal

    def body(s):
        active = s.status == _RUNNING
        t1, dt, hit = _aim(s, stop, adaptive, few_ulps, dtype, jump_at, sign)
        # A group that is done takes a step of size 0 (its result is discarded): nothing it
        # computes can overflow, nor reach a gradient as NaN.
        dt = tf.where(active, dt, tf.zeros_like(dt))
        t1 = tf.where(active, t1, s.t)
        y1, f1, y_error, stages, fevals = solver.trial(func, lane(s.t), s.y, s.f, lane(dt))
        if adaptive:
            err = groups.grouped(controller.error_ratio(s.y, y1, y_error))
            accept = err <= 1.0  # False for NaN
            err_finite = tf.math.is_finite(err)
            # A trial at `min_step` that the control rejects: forced (if finite), or the end.
            # Without a floor, nothing of it enters the loop.
            at_floor = controller.at_floor(dt)
            forced = None
            if at_floor is not None:
                at_floor &= active
                if controller.force_min_step:
                    forced = at_floor & err_finite & tf.logical_not(accept)
                    accept |= forced
            dt_next = controller.next_step(dt, err, solver.error_order, s.history)
            # A step shortened to land on a stop says nothing against the longer step
            # proposed before it.
            longer = tf.abs(s.dt) > tf.abs(dt_next)
            dt_next = tf.where(accept & hit & longer, s.dt, dt_next)
        else:
            err_finite = groups.all_finite(y1)
            accept = err_finite
            dt_next = s.dt
        accept &= active
        history = controller.remember(s.history, err, accept) if adaptive else ()
        retry = s.retry
        if adaptive and solver.hold_after_reject:
            # The step after a rejected trial does not grow (Hairer's RADAU5): an implicit
            # trial whose Newton iterations failed is rejected and shrunk, and the next,
            # accepted, would otherwise grow straight back to the size that failed.
            # (Against the size proposed, not the step shortened to land on a stop.)
            dt_next = tf.where(accept & s.retry & (tf.abs(dt_next) > tf.abs(s.dt)), s.dt,
                               dt_next)
            retry = tf.where(active, tf.logical_not(accept), s.retry)
        dt_next = tf.where(active, dt_next, s.dt)
        y_new = groups.select(accept, y1, s.y)
        if fsal:
            f_new = groups.select(accept, f1, s.f)
        else:
            f_new = tf.cond(tf.reduce_any(accept),
                            lambda: groups.select(accept, func(lane(t1), y1), s.f),
                            lambda: list(s.f))
            fevals += tf.cast(accept, tf.int32)
        t_new = tf.where(accept, t1, s.t)
        # The groups whose `func` is evaluated afresh at the end of the step (after its
        # outputs are saved, which read the step's own last stage): past a jump, or
        # where `on_land` changed the state.
        fresh = []
        if jump_at is not None:
            # Past a jump: the next step starts one ulp after it (its outputs at the
            # jump itself are this step's, saved below).
            jumped = accept & hit & jump_at(s.i_out)
            at_stop = stop(s.i_out)
            t_new = tf.where(jumped, tf.math.nextafter(at_stop, at_stop + sign), t_new)
            fresh.append(jumped)
            replaced = f_new
        num_trials = s.num_trials + tf.cast(active, tf.int32)
        if on_land is not None:
            landed = accept & hit & (next_stop(s.i_out) < num_stops)
            y_new = on_land(s.i_out, landed, y_new)
            fresh.append(landed)
        dense_stages = stages + [f_new] if solver.dense_needs_f1 else stages
        if buffer is None:
            outputs, saved = s.outputs, s.saved
        elif save is None:
            # Written on every trial at the next stop; kept once it is hit. A group that is
            # done writes its final state onto its last stop again.
            index = tf.minimum(s.i_out, num_stops - 1)[:, None]
            values = [_outputs.rows(y, not groups.shared)[:, None] for y in y_new]
            outputs = _outputs.write(buffer._replace(arrays=s.outputs), index,
                                     tf.ones_like(index, tf.bool), values).arrays
            saved = s.saved
        else:
            rows_t = t_new + tf.zeros(tf.shape(s.saved), t_new.dtype) if groups.shared else t_new
            saved = _outputs.count_through(save.keys, rows_t, save.sign)
            outputs = _save_step(solver, save, groups, buffer._replace(arrays=s.outputs), s.saved,
                                 saved, s.t, dt, s.y, dense_stages).arrays
        if fresh:
            refresh = functools.reduce(tf.logical_or, fresh)
            f_new = tf.cond(tf.reduce_any(refresh),
                            lambda: groups.select(refresh, func(lane(t_new), y_new), f_new),
                            lambda: list(f_new))
            fevals += tf.cast(refresh, tf.int32)
        if restarts is not None:  # with `on_land`
            initial_step, selects = restarts
            dt_next = tf.cond(
                tf.reduce_any(landed),
                lambda: tf.where(landed, initial_step(t_new, y_new, f_new), dt_next),
                lambda: dt_next)
            fevals += tf.cast(landed, tf.int32) * int(selects)
            num_trials = tf.where(landed, 0, num_trials)
        i_out = tf.where(accept & hit, next_stop(s.i_out), s.i_out)
        k = tf.where(accept & hit, 0, s.k + tf.cast(accept, tf.int32))
        record = _record.write(s, dt, hit, accept, active, states, dtype)
        if "f_jump" in record:
            record["f_jump"] = _record.at_jumps(record["f_jump"], jumps, s.i_out, jumped,
                                               replaced, groups.shared)
        fevals *= tf.cast(active, tf.int32)
        if adaptive:
            # Underflow: the proposed step no longer changes t in this precision. Only |t|
            # sets the scale, not the stop: a transient at t = 0 may need steps far below
            # the ulps of a distant stop (scipy's `min_step` is 10 ulps of t). Tested
            # after a rejection only: an accepted landing step may be a few ulps long and
            # is no failure. If the last trial was non-finite, that is the cause.
            failed = tf.abs(dt_next) <= few_ulps(tf.abs(t_new))
            if at_floor is not None:
                failed |= at_floor
            failed &= tf.logical_not(accept)
            failure = tf.where(err_finite, int(Status.DT_UNDERFLOW), int(Status.NONFINITE))
        else:
            failed = tf.logical_not(accept)
            failure = tf.constant(int(Status.NONFINITE))
            forced = None
        status = tf.where(
            i_out >= num_stops, int(Status.SUCCESS),
            tf.where(failed, failure,
                     tf.where(num_trials >= max_steps, int(Status.MAX_STEPS_REACHED), _RUNNING)))
        found = s.found
        if event is not None:
            lanes_of = _events.lanes_of(groups)
            lane_time = (lambda t: t) if event.by_batch else (lambda t: t[0])
            found = _events.detect(
                event, solver, s.found, t=s.t, dt=dt, y=s.y, y1=y1, stages=dense_stages,
                accept=accept, entry=s.entries, lanes_of=lanes_of, lane_time=lane_time,
                few_ulps=few_ulps)
            ended = event.ended(found)
            if groups.shared:  # the shared steps end once every lane's event has ended it
                ended = tf.reshape(tf.reduce_all(ended) & (tf.size(ended) > 0), [1])
            status = tf.where(ended, int(Status.EVENT), status)
        rejected = tf.logical_not(accept) & active
        return (_State(
            t=t_new, dt=dt_next, y=y_new, f=f_new, i_out=i_out, k=k, num_trials=num_trials,
            num_steps=s.num_steps + tf.cast(accept, tf.int32),
            num_rejected=s.num_rejected + tf.cast(rejected, tf.int32),
            num_forced=(s.num_forced if forced is None
                        else s.num_forced + tf.cast(forced, tf.int32)),
            num_fevals=s.num_fevals + fevals, status=tf.where(active, status, s.status),
            outputs=outputs, saved=saved, record=record,
            entries=s.entries + tf.cast(tf.reduce_any(accept), tf.int32), found=found,
            history=history, retry=retry,
        ),)

    return body

"""The one integration loop, shared by every gradient strategy.

Algorithm (Hairer, Nørsett & Wanner I, II.4; Zhuang et al., ICML 2020, Algorithm 1):
start at `ts[0]` with `f0 = func(t0, y0)` and a first step `dt`; repeat

1. aim at the next time to step onto, `ts[i]`: if `dt` would reach or pass it, shorten
   the step to land on it exactly. The caller decides what these times are
   (`_outputs`): every output time (outputs exact to the step's accuracy), or only the
   start and the end, with outputs interpolated between the steps;
2. take a trial step of the embedded pair and its error ratio;
3. accept it if the ratio is <= 1, by *selection* (`where(accept, new, old)`): a
   rejected trial changes nothing and, under ACA, leaves nothing behind;
4. propose the next `dt` from the error ratio.

The loop is one `tf.while_loop` of static `max_steps` iterations at most; under XLA
every buffer is sized from `max_steps` and `len(ts)`, so that it compiles. With
`record=True` it also keeps, for each accepted step, its start `(t_i, dt_i, y_i)` and
which output interval it lies in: the checkpoints the ACA backward pass replays; with
`dense=True`, the coefficients of each step's interpolating polynomial too, from which
`_outputs` reads the solution between the steps.
Buffers are written at the index of the next accepted step on every trial; a rejected
trial's entry is overwritten by the retry, so only accepted steps survive.

What `max_steps` costs. Outside XLA (eagerly, in a plain `tf.function`) nothing is
sized by it: the checkpoint buffers grow with the steps taken, so time and memory
follow the steps. Under XLA every buffer needs a static shape, so a call that keeps
checkpoints for a gradient allocates and zero-fills `max_steps x (state + 13 bytes)`
however few steps it takes, and holds it until the backward pass ends; the fill runs at
memory bandwidth. With fewer states kept (`states`: ACA's checkpoint budget `K`, MALI's
none) the state buffer has `K + 1` entries, or none, and only the scalars are sized by
`max_steps`. Writing a step into it and `stack()` are in place (no copy of the
buffer, in the optimized HLO), so the fill is all that grows. With no gradient pending
XLA drops the unused buffers. Measured (`benchmarks/max_steps_xla.py`, 64x64 float32
state, 3 steps, 2-core CPU), forward+backward under XLA: 2.4 ms at max_steps=1,000,
18 ms at 10,000, 134 ms and 1.6 GB at 100,000 (allocating and filling the buffer alone:
1.3, 14 and 131 ms); in a plain `tf.function` 2.2-3.0 ms and under 1 MB at each.
"""

from typing import Any, NamedTuple

import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from tfaca._solution import SolveError, Stats, Status
from tfaca._solvers import per_row

_RUNNING = -1


class Checkpoints(NamedTuple):
    """Accepted steps of a forward solve, as tensors: entry `i < num_steps` is step `i`,
    and entry `num_steps` is where the solve ended (`t_final`, its state, `dt` 1 and
    the end's line, see `c`), so that every accepted state, the last included, has an entry.

    Attributes:
        t: `[num_steps + 1]` start times (`[max_steps + 1]` under XLA, every field).
        dt: `[num_steps + 1]` step sizes.
        interval: `[num_steps + 1]` int32 index `j` of the interval `[ts[j - 1], ts[j]]`
            of the times the loop stepped onto that the step lies in (`()` without
            `record`).
        hit: `[num_steps + 1]` bool, whether the step ends exactly on `ts[j]` (`()`
            without `record`).
        y: flat list of `[num_steps + 1, ...]` start states.
        c: with `dense`, a flat list of `[num_steps + 1, degree, ...]` coefficients of
            each step's interpolating polynomial (`AbstractSolver.dense_coefficients`),
            and at entry `num_steps` those of the line `y + theta f` through the end
            state with the derivative carried there (`f(t_final, y_final)`); else `()`.
        num_steps: int32 scalar.
        accepted: with per-sample steps, `[num_steps + 1, batch]` bool: which samples
            the entry's step moved; else `()`.
        previous: with per-sample steps, `[num_steps + 1, batch]` int32: the entry of
            each sample's accepted step before this entry (-1 if none); at entry
            `num_steps`, each sample's last accepted step. Else `()`.

    With per-sample steps (`integrate(per_sample=True)`) an entry is one iteration of the
    loop in which some sample accepted its trial: `t`, `dt`, `interval` and `hit` are
    `[num_steps + 1, batch]`, the states `[num_steps + 1, batch, ...]`, the coefficients
    `[num_steps + 1, degree, batch, ...]`, and `num_steps` counts those iterations.
    Sample `b`'s own accepted steps are the entries with `accepted[:, b]`; its start
    times are non-decreasing along the entries (a sample waiting on a rejection, or
    done, keeps its time), which is what `_outputs.locate` searches.

    With fewer states kept (`integrate(states=...)`), the scalars still have an entry
    per step, but `y` holds only some start states: none (`states=0`, MALI's, which
    rebuilds them from the end), or the start of every `stride`-th step (`states=K`,
    ACA's checkpoint budget: `y[m]` is step `m * stride`'s start, `ceil(num_steps /
    stride) <= K` entries). `stride` is then an int32 scalar, and `y_end` and `f_end`
    are the state and the carried derivative where the solve ended.
    """

    t: Any
    dt: Any
    interval: Any
    hit: Any
    y: Any
    c: Any
    num_steps: Any
    accepted: Any = ()
    previous: Any = ()
    stride: Any = ()
    y_end: Any = ()
    f_end: Any = ()


class Trajectory(NamedTuple):
    ys: Any  # flat list of [len(ts), ...] tensors
    stats: Stats
    status: Any
    t_final: Any
    checkpoints: Any  # Checkpoints or None
    y_final: Any = ()  # flat list: the state at t_final


class _State(NamedTuple):
    t: Any
    dt: Any
    y: Any
    f: Any
    i_out: Any
    k: Any  # accepted steps since the last output (fixed-step grid index)
    num_trials: Any
    num_steps: Any
    num_rejected: Any
    num_fevals: Any
    status: Any
    ys: Any
    record: Any  # dict of TensorArrays: t, dt, y (list), interval, hit, c (list); or {}
    entries: Any  # per sample: checkpoint entries written (iterations that accepted)
    previous: Any  # per sample: the entry of each sample's last accepted step, or -1


def in_xla_context():
    """Whether ops built now will be compiled by XLA (`jit_compile=True`)."""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


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
        sample = tf.argmax(tf.cast(status != 0, tf.int32), output_type=tf.int32)
        status, t_final = tf.gather(status, sample), tf.gather(t_final, sample)
        where = "sample"
    if hasattr(status, "numpy"):
        code = Status(int(status.numpy()))
        if code != Status.SUCCESS:
            at = f"sample {int(sample)}, " if where else ""
            raise SolveError(
                f"{code.message} (status {code.name}, {at}t={float(t_final)}, {context})")
        return outputs
    if in_xla_context():
        return outputs
    messages = tf.constant([f"{c.message} (status {c.name})" for c in Status])
    data = [messages[status]] + (["sample", sample] if where else []) + ["t =", t_final, context]
    check = graph_assert(status == 0, data)
    with tf.control_dependencies([check]):
        return [tf.identity(x) for x in outputs]


def _keep_thinned(slots, stride, n, y, budget):
    """ACA's checkpoint budget: keeps the start `y` of step `n` in `slots` when `n` is a
    multiple of `stride`, at slot `n // stride`; when that is past the `budget` slots,
    first drops every other slot (slot `j` takes slot `2 j`) and doubles the stride.

    Runs on every trial, like every write of the loop; a rejected trial's write is
    redone by the retry, and a trial that keeps nothing writes to the last slot, which
    is never read. Returns `(slots, stride)`."""

    def thin():
        def move(j, tas):
            return j + 1, [ta.write(j, ta.read(2 * j)) for ta in tas]

        _, moved = tf.while_loop(lambda j, _: j < (budget + 1) // 2, move,
                                 (tf.constant(1, tf.int32), list(slots)))
        return moved, 2 * stride

    full = (n % stride == 0) & (n // stride >= budget)
    slots, stride = tf.cond(full, thin, lambda: (list(slots), stride))
    slot = tf.where(n % stride == 0, n // stride, budget)
    return [ta.write(slot, y_n) for ta, y_n in zip(slots, y)], stride


def _dense(ta, size, like, static_size=None):
    """The first `size` entries of a TensorArray as one tensor.

    Checkpoints leave the loop as plain tensors, not TensorArrays: a SavedModel can
    serialize a custom gradient that captures tensors but not TensorArray handles
    (variants). Outside XLA the buffer holds the trials' entries (one more than the
    accepted steps after a failed solve): gather the accepted ones. XLA needs static
    shapes and returns the whole `max_steps` buffer (without a copy). `like` is a
    tensor shaped as one entry.
    """
    if in_xla_context():
        return ta.stack() if static_size is None else ta.gather(tf.range(static_size - 1))
    # Gathering no entry needs a fully known element shape, which a Keras batch lacks.
    empty = tf.zeros(tf.concat([[0], tf.shape(like)], 0), ta.dtype)
    return tf.cond(size > 0, lambda: ta.gather(tf.range(size)), lambda: empty)


# Outside XLA a TensorArray holds each entry as a tensor of its own, and TensorFlow's
# allocator gives every tensor at least 256 bytes: a step's few scalars would cost 256
# bytes, not 16 (2.5 MB over 10,000 steps, which is what grew MALI's memory). They are
# logged in blocks of this many steps instead.
_BLOCK = 64


def _scalar_log(dtype, max_steps, num_scalars, like):
    """A log of a `[num_scalars, *like.shape]` entry per step (`_log_write`,
    `_log_read`): under XLA a static buffer of `max_steps + 1` entries; elsewhere a
    growing list of `_BLOCK`-entry blocks, the one being filled carried as a tensor."""
    shape = [num_scalars] + like.shape.as_list()
    if in_xla_context():
        return {"entries": _step_array(dtype, max_steps, shape)}
    return {
        "entries": _step_array(dtype, max_steps, [_BLOCK] + shape),
        "block": tf.zeros(tf.concat([[_BLOCK, num_scalars], tf.shape(like)], 0), dtype),
    }


def _log_write(log, at, value, once=False):
    """Writes entry `at`; as every buffer of the loop, on each trial (a rejected trial's
    entry is overwritten by the retry). `once`: the write after the loop, by selection
    over the block rather than a scatter, which fails on an empty batch."""
    if "block" not in log:
        return {"entries": log["entries"].write(at, value)}
    if once:
        rows = tf.reshape(tf.equal(tf.range(_BLOCK), at % _BLOCK),
                          [_BLOCK] + [1] * value.shape.rank)
        block = tf.where(rows, value[None], log["block"])
    else:
        block = tf.tensor_scatter_nd_update(log["block"], [[at % _BLOCK]], value[None])
    return {"entries": log["entries"].write(at // _BLOCK, block), "block": block}


def _log_read(log, size):
    """The first `size` (>= 1) entries as one tensor (all of them under XLA)."""
    if "block" not in log:
        return log["entries"].stack()
    blocks = log["entries"].gather(tf.range((size + _BLOCK - 1) // _BLOCK))
    return tf.reshape(blocks, tf.concat([[-1], tf.shape(log["block"])[1:]], 0))[:size]


def _tensor_array(dtype, size, element_shape):
    return tf.TensorArray(dtype, size=size, element_shape=element_shape, clear_after_read=False)


def _step_array(dtype, max_steps, element_shape):
    """A buffer with an entry per step and one for the end of the solve: `max_steps + 1`
    entries under XLA, which needs static shapes; elsewhere it grows with the steps taken. A TensorArray of `max_steps`
    entries costs O(max_steps) outside XLA too, even empty: its list of entries is
    built and freed on every call (~0.7 ms per buffer at 100,000 entries; a
    forward+backward of 3 steps took 8.4 ms at max_steps=100,000 against 2.4 ms at
    1,000, and held 15 MB of empty entries)."""
    if in_xla_context():
        return _tensor_array(dtype, max_steps + 1, element_shape)
    return tf.TensorArray(
        dtype, size=0, dynamic_size=True, element_shape=element_shape, clear_after_read=False
    )


def _runs(ts):
    """Runs of equal consecutive times in `ts` (`[n]`, or `[batch, n]` row by row):
    `(first, after)`, int32 like `ts`: the index of the first time of each entry's run,
    and the index just past its run. Repeated stops are one stop (padding of times per
    sample; all of a solve's stops when it has nothing to step)."""
    rows = ts if ts.shape.rank == 2 else ts[None]
    moves = tf.cast(tf.not_equal(rows[:, 1:], rows[:, :-1]), tf.int32)
    run = tf.cumsum(tf.concat([tf.zeros_like(moves[:, :1]), moves], axis=1), axis=1)
    first = tf.searchsorted(run, run, side="left", out_type=tf.int32)
    after = tf.searchsorted(run, run, side="right", out_type=tf.int32)
    if ts.shape.rank == 1:
        return first[0], after[0]
    return first, after


def integrate(solver, controller, func, ts, y0, *, step_size, first_step, max_steps, record,
              dense=False, per_sample=False, on_land=None, states=None):
    """Integrates `func` from `ts[0]` through every `ts[i]`, stepping onto each.

    Args:
        solver: an `AbstractSolver`.
        controller: a `StepSizeController` (unused with a fixed `step_size`).
        func: `func(t, y) -> dy/dt` on flat lists of tensors.
        ts: 1-D tensor of strictly monotone output times; with `per_sample`, also
            `[batch, n]`: each sample's own (monotone, possibly repeating) times.
        y0: flat list of state tensors at `ts[0]`.
        step_size: `None` for adaptive stepping, else the fixed step size.
        first_step: `None` to select it automatically, else the first trial step size.
        max_steps: Python int, the largest number of trial steps.
        record: Python bool, whether to keep the ACA checkpoints.
        dense: Python bool, whether to keep each accepted step's interpolating
            polynomial too (`Checkpoints.c`), from which `_outputs.evaluate` reads
            outputs between the steps. It costs no evaluation of `func` (the stages are
            there; a non-FSAL solver's `f(t1, y1)` is evaluated anyway) and keeps
            `degree` more state-sized tensors per accepted step.
        per_sample: Python bool: the leading axis of every state component is a batch,
            and each sample takes its own steps (time, step size, error ratio,
            acceptance, landing on `ts`), as if solved alone; `func` then receives
            `t` of shape `[batch]`. The loop runs until every sample is done (or the
            `max_steps`-th iteration, each running sample taking one trial per
            iteration); a sample that is done is frozen. The controller must be
            built with `per_sample=True`. Times, statistics and status are `[batch]`;
            outputs `[len(ts), batch, ...]`.
        on_land: with `per_sample`, `on_land(i, landed, y) -> y`: called after each
            trial with `i` (`[batch]`, the index into `ts` of each sample's next stop),
            `landed` (`[batch]` bool, the samples whose accepted step ended on it) and
            the accepted states; returns the states to go on from (the adjoint's
            reverse solve resets the state and adds an output's cotangent there). The
            landed samples' derivative is evaluated again at the new state.
        states: with `record`, which accepted states to keep: `None`, every one; `0`,
            none (the step's scalars only); a Python int `K >= 1`, at most `K`, evenly
            spread by thinning: the start of every `stride`-th step is kept, and when the
            `K` slots are full, every other one is dropped and the stride doubles
            (`stride < 2 * num_steps / K`). Not with `dense` or `per_sample`.

    Returns:
        A `Trajectory`; its `checkpoints` are set when `record` or `dense`.
    """
    dtype = ts.dtype
    num_out = tf.shape(ts)[-1]
    # One direction for every sample (the caller checked it); 0 when no sample's times
    # leave the start (all padding): nothing is stepped.
    direction = tf.sign(tf.reduce_sum(ts[..., -1] - ts[..., 0]))
    if per_sample:
        batch = tf.shape(y0[0])[0]
        ts = tf.broadcast_to(ts, tf.stack([batch, num_out]))
        t0 = ts[:, 0]
        rows = tf.range(batch)

        def stop(i):
            return tf.gather(ts, tf.minimum(i, num_out - 1), batch_dims=1)
    else:
        t0 = ts[0]

        def stop(i):
            return ts[tf.minimum(i, num_out - 1)]
    first, after = _runs(ts)

    def next_stop(i):
        """The index of the first stop after the run of equal times that `i` starts."""
        return (tf.gather(after, tf.minimum(i, num_out - 1), batch_dims=1) if per_sample
                else tf.gather(after, tf.minimum(i, num_out - 1)))

    f0 = func(t0, y0)
    num_fevals = tf.ones_like(t0, tf.int32)

    adaptive = step_size is None
    if not adaptive:
        dt0 = direction * step_size * tf.ones_like(t0)
    elif first_step is not None:
        dt0 = controller.clip(direction * first_step * tf.ones_like(t0))
    else:
        dt0 = controller.first_step(func, t0, y0, f0, solver.error_order, direction)
        num_fevals += 1

    if per_sample:
        # Concatenated, not scattered: a scatter into an empty batch fails.
        ys = [tf.concat([y[None], tf.zeros(tf.concat([[num_out - 1], tf.shape(y)], 0), y.dtype)],
                        axis=0) for y in y0]
    else:
        ys = [_tensor_array(y.dtype, num_out, y.shape).write(0, y) for y in y0]
    degree = len(solver.dense_weights[0])
    recorded = {}
    # A step's scalars, (t, dt) and with `record` (interval, hit) too, are packed into
    # one entry of the time's dtype: one write per trial instead of four (each write is
    # an operation of its own in a plain graph, a kernel under XLA). The interval index
    # is exact in it (float32 holds integers to 2**24; the loop takes at most
    # `max_steps` trials).
    num_scalars = (6 if per_sample else 4) if record else 2
    if record or dense:
        recorded["scalars"] = _scalar_log(dtype, max_steps, num_scalars, t0)
        if states is None:
            recorded["y"] = [_step_array(y.dtype, max_steps, y.shape) for y in y0]
        elif states > 0:
            # K slots and a last one that takes the trials' writes that keep nothing.
            recorded["y"] = [_tensor_array(y.dtype, states + 1, y.shape) for y in y0]
            recorded["stride"] = tf.constant(1, tf.int32)
    if dense:
        recorded["c"] = [
            _step_array(y.dtype, max_steps, tf.TensorShape([degree]).concatenate(y.shape))
            for y in y0
        ]

    finfo = tf.experimental.numpy.finfo(dtype.as_numpy_dtype)
    eps, tiny = float(finfo.eps), float(finfo.tiny)

    def few_ulps(magnitude):
        """What "the same time" means near times of this magnitude: 4 ulps of it.

        Relative, so that short time scales work in float32 (ulps of max(|t|, 1) made
        every step under ~5e-7 look like no step); floored at the smallest normal
        number, below which CPUs may flush a step to zero.
        """
        return tf.maximum(4.0 * eps * magnitude, tiny)

    fsal = solver.fsal
    trial_fevals = solver.trial_fevals

    def samplewise_all(tensors):
        """Per sample, whether every element of every tensor holds (`[batch]`)."""
        out = True
        for x in tensors:
            axes = list(range(1, x.shape.rank))
            out &= tf.reduce_all(x, axis=axes) if axes else x
        return out

    def body(s):
        if per_sample:
            active = s.status == _RUNNING
        t_target = stop(s.i_out)
        # Land on the output when the step reaches it or falls short by a few ulps: a
        # sliver step would waste a step and, adaptively, spoil the next step size.
        # "Few ulps" of the times being compared: the rounding of `t + dt` against
        # `t_target` is relative to the larger of them.
        if adaptive:
            slack = few_ulps(tf.maximum(tf.abs(s.t), tf.abs(t_target)))
            remaining = t_target - s.t
            hit = tf.abs(s.dt) >= tf.abs(remaining) - slack
            t1 = tf.where(hit, t_target, s.t + s.dt)
            dt = tf.where(hit, remaining, s.dt)
        else:
            # Fixed steps sit on the grid t_start + k * step_size of their output
            # interval, so rounding does not accumulate over many steps.
            t_start = stop(s.i_out - 1)
            # Distances from t_start are compared: their rounding is relative to the
            # larger end of the interval, whatever part of it the step is in.
            slack = few_ulps(tf.maximum(tf.abs(t_start), tf.abs(t_target)))
            t_grid = t_start + tf.cast(s.k + 1, dtype) * s.dt
            hit = tf.abs(t_grid - t_start) >= tf.abs(t_target - t_start) - slack
            t1 = tf.where(hit, t_target, t_grid)
            dt = t1 - s.t
        if per_sample:
            # A sample that is done takes a step of size 0 (its result is discarded):
            # nothing it computes can overflow, nor reach a gradient as NaN.
            dt = tf.where(active, dt, tf.zeros_like(dt))
            t1 = tf.where(active, t1, s.t)
        y1, f1, y_error, stages = solver.step(func, s.t, s.y, s.f, dt, return_stages=True)

        if adaptive:
            err = controller.error_ratio(s.y, y1, y_error)
            accept = err <= 1.0  # False for NaN
            err_finite = tf.math.is_finite(err)
            dt_next = controller.next_step(dt, err, solver.error_order)
            # A step shortened to land on an output says nothing against the longer step
            # proposed before it.
            longer = tf.abs(s.dt) > tf.abs(dt_next)
            dt_next = tf.where(accept & hit & longer, s.dt, dt_next)
        elif per_sample:
            err_finite = samplewise_all([tf.math.is_finite(y) for y in y1])
            accept = err_finite
            dt_next = s.dt
        else:
            finite = [tf.reduce_all(tf.math.is_finite(y)) for y in y1]
            err_finite = tf.reduce_all(tf.stack(finite))
            accept = err_finite
            dt_next = s.dt
        if per_sample:
            accept &= active
            dt_next = tf.where(active, dt_next, s.dt)

        def select(new, old):
            return [tf.where(per_row(accept, a), a, b) for a, b in zip(new, old)]

        y_new = select(y1, s.y)
        if fsal:
            f_new = select(f1, s.f)
            fevals = trial_fevals
        elif per_sample:
            f_new = tf.cond(tf.reduce_any(accept), lambda: select(func(t1, y1), s.f),
                            lambda: s.f)
            fevals = trial_fevals + tf.cast(accept, tf.int32)
        else:
            f_new = tf.cond(accept, lambda: func(t1, y1), lambda: s.f)
            fevals = trial_fevals + tf.cast(accept, tf.int32)
        t_new = tf.where(accept, t1, s.t)
        if on_land is not None:
            landed = accept & hit
            y_new = on_land(s.i_out, landed, y_new)
            f_new = tf.cond(tf.reduce_any(landed),
                            lambda: [tf.where(per_row(landed, a), a, b)
                                     for a, b in zip(func(t_new, y_new), f_new)],
                            lambda: list(f_new))
            fevals += tf.cast(landed, tf.int32)
        # Written on every trial at the index of the next output; kept once it is hit.
        if per_sample:
            # A sample that is done writes its final state onto its last output again.
            where = tf.stack([tf.minimum(s.i_out, num_out - 1), rows], axis=1)
            ys_new = [tf.tensor_scatter_nd_update(out, where, y) for out, y in zip(s.ys, y_new)]
        else:
            ys_new = [ta.write(s.i_out, y) for ta, y in zip(s.ys, y_new)]
        i_out = tf.where(accept & hit, next_stop(s.i_out), s.i_out)
        k = tf.where(accept & hit, 0, s.k + tf.cast(accept, tf.int32))

        # Written on every trial at the index of the next accepted step: a rejected
        # trial's entry is overwritten by the retry. Per sample, at the next iteration
        # in which some sample accepts.
        new_record = dict(s.record)
        at = s.entries if per_sample else s.num_steps
        if "scalars" in new_record:
            # A step of size 0 (a sample done) is recorded as 1: interpolation divides by it.
            scalars = [s.t, tf.where(active, dt, tf.ones_like(dt)) if per_sample else dt]
            if record:
                scalars += [tf.cast(s.i_out, dtype), tf.cast(hit, dtype)]
                if per_sample:
                    scalars += [tf.cast(accept, dtype), tf.cast(s.previous, dtype)]
            new_record["scalars"] = _log_write(s.record["scalars"], at, tf.stack(scalars))
            if states is None:
                new_record["y"] = [ta.write(at, y) for ta, y in zip(s.record["y"], s.y)]
            elif states > 0:
                new_record["y"], new_record["stride"] = _keep_thinned(
                    s.record["y"], s.record["stride"], at, s.y, states)
        if dense:
            if solver.dense_needs_f1:
                stages = stages + [f_new]
            coefficients = solver.dense_coefficients(dt, stages)
            new_record["c"] = [ta.write(at, c) for ta, c in zip(s.record["c"], coefficients)]

        if per_sample:
            num_trials = s.num_trials + tf.cast(active, tf.int32)
            fevals *= tf.cast(active, tf.int32)
        else:
            num_trials = s.num_trials + 1
        if adaptive:
            # Underflow: the proposed step no longer changes t in this precision. Only
            # |t| sets the scale, not the output time: a transient at t = 0 may need
            # steps far below the ulps of a distant output (scipy's `min_step` is 10
            # ulps of t). Tested after a rejection only: an accepted landing step may
            # be a few ulps long and is no failure. If the last trial was non-finite,
            # that is the cause worth reporting.
            failed = tf.logical_not(accept) & (tf.abs(dt_next) <= few_ulps(tf.abs(t_new)))
            failure = tf.where(err_finite, int(Status.DT_UNDERFLOW), int(Status.NONFINITE))
        else:
            failed = tf.logical_not(accept)
            failure = tf.constant(int(Status.NONFINITE))
        status = tf.where(
            i_out >= num_out,
            int(Status.SUCCESS),
            tf.where(
                failed,
                failure,
                tf.where(num_trials >= max_steps, int(Status.MAX_STEPS_REACHED), _RUNNING),
            ),
        )
        rejected = tf.logical_not(accept)
        if per_sample:
            status = tf.where(active, status, s.status)
            rejected &= active
        return (
            _State(
                t=t_new,
                dt=dt_next,
                y=y_new,
                f=f_new,
                i_out=i_out,
                k=k,
                num_trials=num_trials,
                num_steps=s.num_steps + tf.cast(accept, tf.int32),
                num_rejected=s.num_rejected + tf.cast(rejected, tf.int32),
                num_fevals=s.num_fevals + fevals,
                status=status,
                ys=ys_new,
                record=new_record,
                entries=s.entries + tf.cast(tf.reduce_any(accept), tf.int32) if per_sample
                else s.entries,
                previous=tf.where(accept, at, s.previous) if per_sample else s.previous,
            ),
        )

    zero = tf.zeros_like(t0, tf.int32)
    # Non-finite times (XLA's report of times that are not monotone, see `_odeint`) fail
    # at once too, rather than after `max_steps` trials that cannot advance.
    times_finite = tf.reduce_all(tf.math.is_finite(ts))
    if per_sample:
        f0_finite = samplewise_all([tf.math.is_finite(f) for f in f0]) & times_finite
    else:
        f0_finite = tf.reduce_all(
            tf.stack([tf.reduce_all(tf.math.is_finite(f)) for f in f0] + [times_finite])
        )
    # A solve whose stops all repeat the start (all padding) is done before any step.
    i_out = next_stop(zero)
    state = _State(
        t=t0,
        dt=dt0,
        y=list(y0),
        f=list(f0),
        i_out=i_out,
        k=zero,
        num_trials=zero,
        num_steps=zero,
        num_rejected=zero,
        num_fevals=num_fevals,
        status=tf.where(i_out >= num_out, int(Status.SUCCESS),
                        tf.where(f0_finite, _RUNNING, int(Status.NONFINITE))),
        ys=ys,
        record=recorded,
        entries=tf.constant(0, tf.int32),
        previous=zero - 1,
    )
    (state,) = tf.while_loop(
        lambda s: tf.reduce_any(s.status == _RUNNING) if per_sample else s.status == _RUNNING,
        body,
        (state,),
        maximum_iterations=max_steps,
    )
    # A stop that repeats the one before it is the same output: the state written at
    # the first of its run. Outputs the solve did not reach are NaN, never a stale state.
    ys_out = []
    if per_sample:
        first = tf.transpose(first)  # [len(ts), batch]
        reached = first < state.i_out[None, :]
    else:
        reached = first < state.i_out
    for out in state.ys:
        stacked = out if per_sample else out.stack()
        if per_sample:
            stacked = tf.gather_nd(stacked, tf.stack(
                [first, tf.broadcast_to(rows, tf.shape(first))], axis=-1))
        else:
            stacked = tf.gather(stacked, first)
        mask = tf.reshape(reached, tf.concat(
            [tf.shape(reached), [1] * (stacked.shape.rank - reached.shape.rank)], 0))
        ys_out.append(tf.where(mask, stacked, tf.constant(float("nan"), stacked.dtype)))

    checkpoints = None
    if record or dense:
        rec = state.record
        n = state.entries if per_sample else state.num_steps
        # Entry n: where the solve ended, so that every accepted state has an entry.
        last = [state.t, tf.ones_like(t0)]
        if record:
            last += [tf.cast(state.i_out, dtype), tf.zeros_like(t0)]
            if per_sample:
                last += [tf.zeros_like(t0), tf.cast(state.previous, dtype)]
        end = {"scalars": _log_write(rec["scalars"], n, tf.stack(last), once=True)}
        if states is None:
            end["y"] = [ta.write(n, y) for ta, y in zip(rec["y"], state.y)]
        if dense:
            # The end's "interpolant" extends the last state linearly, y_n + (t - t_n) f_n
            # (`dt` 1): it is y_n at t_n, and an output there takes the derivative of its
            # time from it, as one inside a step does from that step's polynomial.
            ends = [tf.concat([f[None], tf.zeros(tf.concat([[degree - 1], tf.shape(f)], 0),
                                                 f.dtype)], 0) for f in state.f]
            end["c"] = [ta.write(n, c) for ta, c in zip(rec["c"], ends)]
        size = n + 1
        # Each column a copy of its own: the log is freed once they are taken.
        scalars = _log_read(end["scalars"], size)
        checkpoints = Checkpoints(
            t=scalars[:, 0],
            dt=scalars[:, 1],
            interval=tf.cast(scalars[:, 2], tf.int32) if record else (),
            hit=scalars[:, 3] > 0 if record else (),
            y=[_dense(ta, size, y) for ta, y in zip(end["y"], y0)] if states is None else
            [_dense(ta, (n + rec["stride"] - 1) // rec["stride"], y, states + 1)
             for ta, y in zip(rec["y"], y0)] if states else (),
            c=[_dense(ta, size, c) for ta, c in zip(end["c"], ends)] if dense else (),
            num_steps=n,
            accepted=scalars[:, 4] > 0 if record and per_sample else (),
            previous=tf.cast(scalars[:, 5], tf.int32) if record and per_sample else (),
            stride=rec["stride"] if states else (),
            y_end=list(state.y) if states is not None else (),
            f_end=list(state.f) if states is not None else (),
        )
    stats = Stats(
        num_steps=state.num_steps,
        num_rejected=state.num_rejected,
        num_fevals=state.num_fevals,
    )
    status = tf.where(
        state.status == _RUNNING, int(Status.MAX_STEPS_REACHED), state.status
    )
    return Trajectory(
        ys=ys_out, stats=stats, status=status, t_final=state.t, checkpoints=checkpoints,
        y_final=list(state.y),
    )

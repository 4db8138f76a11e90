"""Where outputs come from: stepping onto them, or reading them inside the steps.

The loop (`_loop.integrate`) steps onto a list of times, the *stops*. This module decides
what they are and how outputs are read (the idea of diffrax's `SaveAt`):

- `interpolate=False`: the stops are the output times; every output is a step's end
  (exact to the step's accuracy), and `len(ts) - 1` intervals cost at least as many
  steps.
- `interpolate=True` (the default): the stops are only the start and the last time, so
  the steps are chosen by error control alone, and each output is read from the
  continuous extension of the accepted step it falls in (`AbstractSolver.dense_weights`:
  fourth order for Dopri5 and Tsit5, cubic Hermite for the others), as torchdiffeq,
  TorchDiffEqPack, diffrax and TFP do: when the step is accepted, inside the loop, from
  its stages. Outputs then cost no steps and no evaluations of `func`, and nothing is
  kept per step for them. With two times there is nothing to interpolate and the two
  modes are the same solve.

Output times have a leading axis of *rows*: one row for times the batch shares, or one
per sample (`ts` of shape `(batch, n)`, the state's leading axis being the batch; or
shared times with per-sample steps). A row may end in repeats of its last time (padding
for series with fewer observations): a repeated time gives the same state as the one
before it, and the caller (`_odeint`) cuts it from every gradient.

An output at `tau` inside step `(t_i, dt_i, y_i)` with stages `k_s` is
`y_i + dt_i sum_s b_s(theta) k_s`, `theta = (tau - t_i) / dt_i` in `(0, 1]`,
`b_s(theta) = sum_p w[s][p] theta^(p + 1)`; it is evaluated as the polynomial
`y_i + dt_i sum_p theta^(p + 1) c_p` whose coefficients `c_p = sum_s w[s][p] k_s` the step
computes once (`coefficients`). The outputs a step covers are those with
`t_i < tau <= t_i + dt_i` (in the direction of time): counted by a binary search of the
step's two ends among the row's times, the same way forward and backward.
"""

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from tfaca._internals import in_xla_context

# Outputs evaluated together inside a step: one small matmul per chunk. A step that
# covers more runs the chunk loop again; one that covers none runs it zero times.
CHUNK = 8


def at_stop(values, i):
    """`[G]`: `values[g, i[g]]` of a `[G, S]` tensor laid out like the stops, `i` past the
    last stop reading the last (a group that is done has passed it)."""
    return tf.gather(values, tf.minimum(i, tf.shape(values)[1] - 1), batch_dims=1)


class Plan(NamedTuple):
    """How a solve produces its outputs.

    Attributes:
        stops: the times the loop steps onto (`ts` itself, or `[t0, t_end]`); `[S]`, or
            `[batch, S]` with per-sample steps and times per sample.
        ts: the times to interpolate at, every output time after the start (`[n - 1]`,
            or `[batch, n - 1]` per sample), or None when the outputs are the states at
            the stops. The first output is `y0` itself.
    """

    stops: Any
    ts: Any

    @property
    def dense(self):
        return self.ts is not None


def plan(ts, interpolate, per_sample=False):
    """The `Plan` for output times `ts` (checked by the caller: rank 1 or 2, monotone).

    With per-sample steps and times per sample, each sample stops at its own times:
    `[batch, 2]` stops (its start and its last time) when interpolating, else every
    one of its times."""
    if ts.shape.rank == 2:
        # Each row's last real time (padding repeats it, and the caller cuts padding
        # from the gradient): the end of a solve is a function of it.
        last = last_times(ts)
    if ts.shape.rank == 2 and per_sample:
        if not interpolate:
            return Plan(stops=ts, ts=None)
        return Plan(stops=tf.stack([ts[:, 0], last], axis=1), ts=ts[:, 1:])
    if ts.shape.rank == 2:
        t0 = common_start(ts)
        # The row whose last time lies farthest from the start ends the solve (the start
        # itself when none leaves it, or the batch is empty). The outputs there take
        # their time's gradient each through their own time.
        ends = tf.concat([last, [t0]], 0)
        t_end = tf.gather(ends, tf.argmax(tf.abs(ends - t0)))
        return Plan(stops=tf.stack([t0, t_end]), ts=ts[:, 1:])
    if not interpolate or ts.shape[0] == 2:
        return Plan(stops=ts, ts=None)
    return Plan(stops=tf.stack([ts[0], ts[-1]]), ts=ts[1:])


def with_stops(plan, knots, per_sample, jump=True, flags=None):
    """`(plan, flags)`: `plan` whose stops also hold the `knots` (`[R, n]`, R = 1 or the
    batch) that lie strictly inside each solve, and which of its stops are jumps (bool,
    like its stops): these knots where `jump`, and the stops `flags` marked already (None:
    none). Knots are constants of the steps (no gradient reaches them through where the
    steps end: a knot does not move with the outputs); a knot on or outside the start and
    the end becomes a copy of the end. Outputs that were stops are read by
    interpolation, each then a stop as before (a knot at the same time comes first)."""
    stops = plan.stops
    ts = plan.ts if plan.dense else stops[..., 1:]
    knots = tf.stop_gradient(tf.cast(knots, stops.dtype))
    if knots.shape.rank == 1:
        knots = knots[None]
    if stops.shape.rank == 1 and (knots.shape[0] == 1 or not per_sample):
        rows, knots = stops[None], tf.reshape(knots, [1, -1])
    else:
        batch = tf.shape(knots)[0] if stops.shape.rank == 1 else tf.shape(stops)[0]
        rows = tf.broadcast_to(stops if stops.shape.rank == 2 else stops[None],
                               tf.stack([batch, tf.shape(stops)[-1]]))
        knots = tf.broadcast_to(knots, tf.stack([batch, tf.shape(knots)[1]]))
    old = tf.zeros_like(rows, tf.bool) if flags is None else tf.broadcast_to(
        flags[None] if flags.shape.rank == 1 else flags, tf.shape(rows))
    sign = tf.sign(tf.reduce_sum(rows[:, -1] - rows[:, 0]))
    start, end = rows[:, :1], rows[:, -1:]
    inside = (sign * (knots - start) > 0) & (sign * (end - knots) > 0)
    knots = tf.where(inside, knots, tf.broadcast_to(end, tf.shape(knots)))
    merged = tf.concat([knots, rows], axis=1)
    flags = tf.concat([inside if jump else tf.zeros_like(inside), old], axis=1)
    order = tf.argsort(sign * merged, axis=1, stable=True)
    merged = tf.gather(merged, order, batch_dims=1)
    flags = tf.gather(flags, order, batch_dims=1)
    if stops.shape.rank == 1 and merged.shape[0] == 1:
        merged, flags = merged[0], flags[0]
    return Plan(stops=merged, ts=ts), flags


class Rows(NamedTuple):
    """Output times laid out by rows, as the loop saves them and the replays read them."""

    ts: Any  # [R, n]: each row's output times, the start first
    by_batch: bool  # R is the batch (times or steps per sample), else R = 1


def output_rows(plan, per_sample, batch):
    """The plan's interpolated output times with the start, by rows (`Rows`): one row when
    steps and times are shared, else one per sample (`batch`, a scalar tensor)."""
    by_batch = per_sample or plan.ts.shape.rank == 2
    stops = plan.stops[None] if plan.stops.shape.rank == 1 else plan.stops
    ts = plan.ts[None] if plan.ts.shape.rank == 1 else plan.ts
    num_rows = batch if by_batch else 1
    start = tf.broadcast_to(stops[:, :1], tf.stack([num_rows, 1]))
    ts = tf.broadcast_to(ts, tf.stack([num_rows, tf.shape(ts)[1]]))
    return Rows(tf.concat([start, ts], axis=1), by_batch)


def common_start(ts):
    """`ts[0, 0]` of 2-D times (every row starts there), and 0 for an empty batch."""
    return tf.reduce_sum(ts[:1, 0])


def last_times(ts):
    """`[batch]`: each row's last time that is not a repeat (where its solve ends)."""
    return tf.gather(ts, last_real(ts), batch_dims=1)


def last_real(ts):
    """`[batch]` int32: the index of each row's last time that is not a repeat."""
    new = tf.cast(tf.not_equal(ts[:, 1:], ts[:, :-1]), tf.int32)
    return tf.reduce_sum(new, axis=1)


def direction(plan):
    """+1 or -1: the sign of the solve's time direction, from its stops (never from the
    steps, which a solve that failed at once does not have)."""
    return tf.sign(tf.reduce_sum(plan.stops[..., -1] - plan.stops[..., 0]))


def rows(x, by_batch):
    """A state component laid out by rows: `[R, ...]` (a leading 1 when rows are shared)."""
    return x if by_batch else x[None]


def unrows(x, by_batch):
    """The inverse of `rows` on `[R, ...]`."""
    return x if by_batch else x[0]


def count_through(keys, t_rows, sign):
    """`[R]` int32: how many of each row's output times lie at or before `t_rows` (`[R]`),
    in the direction of time. `keys`: `sign * ts`, `[R, n]`, non-decreasing."""
    return tf.searchsorted(keys, (sign * t_rows)[:, None], side="right", out_type=tf.int32)[:, 0]


def keeping_shapes(body, init):
    """`body` whose outputs keep the static shapes of the loop's `init` (the reshapes inside
    lose them, which `tf.while_loop` refuses)."""
    def wrapped(*args):
        out = body(*args)
        for x, like in zip(tf.nest.flatten(out), tf.nest.flatten(init)):
            if isinstance(x, tf.Tensor) and isinstance(like, tf.Tensor):
                x.set_shape(like.shape)
        return out

    return wrapped


def powers(theta, degree, derivative=False):
    """`theta^(p + 1)` for `p < degree` (`[..., degree]`), or their derivatives
    `(p + 1) theta^p`."""
    out, power = [], tf.ones_like(theta)
    for p in range(degree):
        out.append(power * (p + 1) if derivative else power * theta)
        power = power * theta
    return tf.stack(out, axis=-1)


def _flat_rows(x, by_batch):
    r = rows(x, by_batch)
    shape = tf.shape(r)
    return tf.reshape(r, tf.stack([shape[0], tf.reduce_prod(shape[1:])])), shape[1:]


def _weights(solver, dtype):
    """The solver's continuous extension, `w[s][p]` (`[S, degree]`, `dense_weights`)."""
    return tf.constant(np.asarray(solver.dense_weights, dtype=np.float64), dtype)


def coefficients(solver, stages, by_batch):
    """A step's interpolant as a polynomial in `theta`: per state component `[R, degree, E]`
    (flat rows), `c_p = sum_s w[s][p] k_s`, so that an output is
    `y + dt sum_p theta^(p + 1) c_p`. Once per step; an output then costs `degree`
    multiply-adds per element, not one per stage."""
    out = []
    for n in range(len(stages[0])):
        k = tf.stack([_flat_rows(stage[n], by_batch)[0] for stage in stages], axis=1)  # [R, S, E]
        out.append(tf.matmul(tf.transpose(_weights(solver, k.dtype))[None], k))
    return out


def expand(v, like):
    """`[R, C]` laid out to scale `[R, C, ...]`."""
    return tf.reshape(v, tf.concat([tf.shape(v), tf.ones([like.shape.rank - 2], tf.int32)], 0))


def interpolate(y, coeffs, dt_rows, theta, by_batch):
    """The step's continuous extension (`coefficients`) at `theta` (`[R, C]`): `[R, C, ...]`
    per component."""
    out = []
    for y_n, c in zip(y, coeffs):
        r = rows(y_n, by_batch)
        scale = dt_rows[:, None, None] * powers(theta, c.shape[1])  # [R, C, degree]
        increment = tf.matmul(scale, c)  # [R, C, E]
        shape = tf.concat([tf.shape(theta), tf.shape(r)[1:]], 0)
        out.append(r[:, None] + tf.reshape(increment, shape))
    return out


class Buffer(NamedTuple):
    """The outputs of a solve as the loop writes them, per state component. Entry `k * R + r`
    is output `k` of row `r`; it starts as NaN (or `y0`, for the outputs at the start), so
    that an output that no step reached (a failed solve) reads NaN, never a stale state.

    Under XLA one tensor `[n * R, E]` (`E` elements per entry), written in place by
    scatters; a write that keeps nothing goes past the end, which XLA drops; read back as a
    reshape, no copy. Outside XLA a TensorArray, each entry a tensor of its own, so that a
    write costs what it writes, never a copy of the whole buffer (TensorFlow's executor
    copies a scattered tensor; XLA has no scatter into a TensorArray); it has one more
    entry, which takes the writes that keep nothing."""

    arrays: Any
    size: Any  # n, the number of outputs per row
    num_rows: Any  # R
    by_batch: bool


def new_buffer(y0, size, num_rows, by_batch, start):
    """A `Buffer` of `size` outputs per row: output `k` of row `r` is `y0`'s row `r` where
    `k < start[r]` (`[R]`), NaN elsewhere."""
    arrays = []
    at_start = tf.range(size)[:, None] < start[None, :]  # [n, R]
    for y in y0:
        r = rows(y, by_batch)
        element = tf.shape(r)[1:]
        entries = tf.where(expand(at_start, r[None]), r[None], tf.constant(np.nan, y.dtype))
        flat = tf.reshape(entries, tf.concat([[size * num_rows], element], 0))
        if in_xla_context():
            arrays.append(tf.reshape(flat, tf.stack([size * num_rows, tf.reduce_prod(element)])))
            continue
        ta = tf.TensorArray(y.dtype, size=size * num_rows + 1, element_shape=r.shape[1:],
                            clear_after_read=False)
        flat = tf.concat([flat, tf.zeros(tf.concat([[1], element], 0), y.dtype)], 0)
        arrays.append(ta.scatter(tf.range(size * num_rows + 1), flat))
    return Buffer(arrays, size, num_rows, by_batch)


def write(buffer, index, valid, values):
    """Writes `values` (per component `[R, C, ...]`) at outputs `index` (`[R, C]`) where
    `valid`."""
    r = tf.range(buffer.num_rows)[:, None]
    past_end = buffer.size * buffer.num_rows
    flat = tf.reshape(tf.where(valid, index * buffer.num_rows + r, past_end), [-1])
    arrays = []
    for array, v in zip(buffer.arrays, values):
        v = tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], 0))
        if isinstance(array, tf.TensorArray):
            arrays.append(array.scatter(flat, v))
            continue
        # No update at all into an empty buffer (a replica's empty batch): XLA refuses any.
        count = tf.minimum(tf.size(array), 1) * tf.shape(flat)[0]
        v = tf.reshape(v, tf.stack([tf.shape(v)[0], tf.reduce_prod(tf.shape(v)[1:])]))
        # A write past the end is dropped, but the scatter's gradient reads its cotangent
        # with a gather, which XLA clamps into the buffer: it would take the last
        # output's. Such a write takes no gradient (the naive gradient backpropagates it).
        v = tf.where(tf.reshape(valid, [-1, 1]), v, tf.stop_gradient(v))
        arrays.append(tf.tensor_scatter_nd_update(array, flat[:count, None], v[:count]))
    return buffer._replace(arrays=arrays)


def read(buffer, like):
    """The outputs, `[n, ...]` (`[n, batch, ...]` by rows), per component of `like`."""
    out = []
    for array, y in zip(buffer.arrays, like):
        used = tf.range(buffer.size * buffer.num_rows)
        element = tf.shape(rows(y, buffer.by_batch))[1:]
        if isinstance(array, tf.TensorArray) and tf.executing_eagerly() and not used.shape[0]:
            # Eagerly, gathering no entry gives a float32 tensor that no tape connects to
            # the state: an empty batch's outputs are the state's empty rows instead.
            flat = tf.reshape(rows(y, buffer.by_batch), tf.concat([[-1], element], 0))
            stacked = tf.gather(flat, tf.zeros([0], tf.int32))
        elif isinstance(array, tf.TensorArray):
            stacked = array.gather(used)
        else:
            stacked = array
        # The element shape from the state: an empty batch's gather has lost it.
        shaped = tf.reshape(stacked, tf.concat([[buffer.size, buffer.num_rows], element], 0))
        shaped = shaped if buffer.by_batch else shaped[:, 0]
        shaped.set_shape(tf.TensorShape([None]).concatenate(y.shape))
        out.append(shaped)
    return out


def cotangent_rows(g_ys, by_batch):
    """Output cotangents (`[n, ...]`, or `[n, batch, ...]`) laid out `[R, n, ...]`."""
    if not by_batch:
        return [g[None] for g in g_ys]
    return [tf.transpose(g, [1, 0] + list(range(2, g.shape.rank))) for g in g_ys]


class Chunk(NamedTuple):
    """`C` consecutive outputs of each row inside a step (`for_covered`)."""

    index: Any  # [R, C] int32, clipped to the outputs
    valid: Any  # [R, C] bool: the outputs the step covers
    theta: Any  # [R, C]: where they lie in the step, 0 where not valid

    def take(self, x):
        """`x[r, index[r]]` (`[R, C, ...]`) of `x` (`[R, n, ...]`). A gather, never a
        slice: XLA takes a slice's start as a constant, which made the compiled replay's
        checkpoint times constants too, and the replay compiled again at every call."""
        return tf.gather(x, self.index, batch_dims=1)


def for_covered(ts_rows, lo, hi, t_rows, dt_rows, body, init):
    """The chunk loop over the outputs `lo <= k < hi` of each row (`[R]`) that a step
    `(t_rows, dt_rows)` covers: `body(chunk, *carry) -> carry` for `CHUNK` outputs at a
    time (a `Chunk`). It runs no iteration for a step that covers none; its bound is
    static (`ceil(n / C)`), as XLA's gradient of a loop needs."""
    n = ts_rows.shape[1]
    chunk = CHUNK if n is None else max(1, min(n - 1, CHUNK))
    size = tf.shape(ts_rows)[1]

    def step(c0, *carry):
        position = lo[:, None] + c0 + tf.range(chunk)[None]
        valid = position < hi[:, None]
        index = tf.minimum(position, size - 1)
        theta = (tf.gather(ts_rows, index, batch_dims=1) - t_rows[:, None]) / dt_rows[:, None]
        theta = tf.where(valid, theta, tf.zeros_like(theta))
        return (c0 + chunk, *body(Chunk(index, valid, theta), *carry))

    loop_vars = (tf.constant(0, tf.int32), *init)
    out = tf.while_loop(lambda c0, *_: tf.reduce_any(lo + c0 < hi),
                        keeping_shapes(step, loop_vars), loop_vars,
                        maximum_iterations=None if n is None else -(-n // chunk))
    return out[1:]


class StepPullback(NamedTuple):
    """The cotangents that a step's outputs send back onto the step (`pullback_step`)."""

    g_y: Any  # per component, [R, ...]: on the step's start state
    g_stages: Any  # per stage, per component, [R, ...]: on the stage
    g_t: Any  # [R]: on the step's start time
    g_dt: Any  # [R]: on its size
    g_ts: Any  # [R, n]: on the output times, accumulated


def _taken(chunk, g_rows, num_rows):
    """The chunk's output cotangents, per component `[R, C, E]`."""
    return [tf.reshape(chunk.take(g), tf.stack([num_rows, tf.shape(chunk.index)[1], -1]))
            for g in g_rows]


def _sums(chunk, gs, degree):
    """The chunk's part of `coefficient_cotangents`, from its cotangents `gs` (`_taken`)."""
    valid = tf.cast(chunk.valid, chunk.theta.dtype)
    # Zero weights for the outputs that are not valid, rather than zeroed cotangents.
    weights = powers(chunk.theta, degree) * valid[:, :, None]  # [R, C, degree]
    both = tf.concat([valid[:, :, None], weights], axis=2)  # [R, C, 1 + degree]
    return [tf.matmul(both, g, transpose_a=True) for g in gs]


def coefficient_cotangents(ts_rows, lo, hi, t_rows, dt_rows, g_rows, degree):
    """What the outputs `lo <= k < hi` inside a step (`[R]` each) send onto its interpolant,
    from their cotangents `g_rows` alone: per state component `[R, 1 + degree, E]`, row 0
    `sum_k g_k` (onto the step's start) and row `1 + p` `sum_k theta_k^(p + 1) g_k`
    (onto `c_p`, before the factor `dt`). No stage value is needed: ACA computes them for
    a step before it replays the step (`stage_cotangents`)."""
    num_rows = tf.shape(ts_rows)[0]

    def body(chunk, sums):
        more = _sums(chunk, _taken(chunk, g_rows, num_rows), degree)
        return ([s + d for s, d in zip(sums, more)],)

    init = [tf.zeros(tf.stack([num_rows, 1 + degree, tf.reduce_prod(tf.shape(g)[2:])]), g.dtype)
            for g in g_rows]
    (sums,) = for_covered(ts_rows, lo, hi, t_rows, dt_rows, body, (init,))
    return sums


def stage_cotangents(solver, sums, dt_rows, like, by_batch, stages=None):
    """The cotangents on the stages `stages` (indices; default all) from the step's
    `coefficient_cotangents`: `dt sum_p w[s][p] sums[1 + p]`, per stage, per component
    shaped as `like`'s components."""
    weights = _weights(solver, dt_rows.dtype)
    if stages is not None:
        weights = tf.gather(weights, stages)
    num_rows = tf.shape(dt_rows)[0]
    out = [dt_rows[:, None, None] * tf.matmul(weights[None], g[:, 1:]) for g in sums]  # [R, S, E]
    shapes = [_flat_rows(x, by_batch)[1] for x in like]
    return [[unrows(tf.reshape(g[:, s], tf.concat([[num_rows], shape], 0)), by_batch)
             for g, shape in zip(out, shapes)] for s in range(weights.shape[0])]


def pullback_step(solver, ts_rows, lo, hi, t_rows, dt_rows, stages, g_rows, g_ts, by_batch,
                  sums=None):
    """The transpose of the outputs a step writes: for the outputs `lo <= k < hi` of each row
    inside the step `(t_rows, dt_rows)` (`[R]`) with stage values `stages`, and their
    cotangents `g_rows` (`cotangent_rows`), the cotangents on the step's start, stages, time
    and size, and (added to `g_ts`, `[R, n]`) on the output times. `sums`: the step's
    `coefficient_cotangents` if computed already, else computed here in the same loop.

    An output is `y + dt sum_p theta^(p + 1) c_p` (`coefficients`: `c_p = sum_s w[s][p] k_s`)
    with `theta = (tau - t) / dt`. With `D = sum_p (p + 1) theta^p c_p` (its derivative in
    time) and `V = sum_p theta^(p + 1) c_p`, its cotangent `g` gives `g` on `y`,
    `dt theta^(p + 1) g` on `c_p` (so `sum_p w[s][p] dt theta^(p + 1) g` on `k_s`), `<g, D>`
    on `tau`, `-<g, D>` on `t` and `<g, V> - theta <g, D>` on `dt`. Both inner products come
    from `<g, c_p>`, one small matmul per chunk of outputs."""
    num_rows = tf.shape(ts_rows)[0]
    coeffs = coefficients(solver, stages, by_batch)
    degree = coeffs[0].shape[1]
    given = sums is not None

    def body(chunk, sums, g_t, g_dt, g_ts):
        valid = tf.cast(chunk.valid, ts_rows.dtype)
        gs = _taken(chunk, g_rows, num_rows)
        if not given:
            sums = [s + d for s, d in zip(sums, _sums(chunk, gs, degree))]
        inner = tf.add_n([tf.matmul(g, c, transpose_b=True) for g, c in zip(gs, coeffs)])
        u = tf.reduce_sum(powers(chunk.theta, degree, derivative=True) * valid[:, :, None] * inner,
                          axis=2)
        w = tf.reduce_sum(powers(chunk.theta, degree) * valid[:, :, None] * inner, axis=2)
        where = tf.stack([tf.broadcast_to(tf.range(num_rows)[:, None], tf.shape(chunk.index)),
                          chunk.index], -1)
        g_ts = tf.tensor_scatter_nd_add(g_ts, tf.reshape(where, [-1, 2]), tf.reshape(u, [-1]))
        return (sums, g_t - tf.reduce_sum(u, 1), g_dt + tf.reduce_sum(w - chunk.theta * u, 1), g_ts)

    zeros_rows = tf.zeros([num_rows], ts_rows.dtype)
    init = [] if given else [tf.zeros_like(tf.concat([c[:, :1], c], 1)) for c in coeffs]
    sums_out, g_t, g_dt, g_ts = for_covered(ts_rows, lo, hi, t_rows, dt_rows, body,
                                            (init, zeros_rows, zeros_rows, g_ts))
    sums = sums if given else sums_out
    shapes = [_flat_rows(x, by_batch)[1] for x in stages[0]]
    g_y = [unrows(tf.reshape(g[:, 0], tf.concat([[num_rows], shape], 0)), by_batch)
           for g, shape in zip(sums, shapes)]
    g_stages = stage_cotangents(solver, sums, dt_rows, stages[0], by_batch)
    return StepPullback(g_y=g_y, g_stages=g_stages, g_t=g_t, g_dt=g_dt, g_ts=g_ts)


def dot_covered(solver, ts_rows, lo, hi, t_rows, dt_rows, y, stages, g_rows, by_batch):
    """`sum <g_k, y(tau_k)>` over the outputs `lo <= k < hi` of each row inside a step, as a
    differentiable function of the step (ACA's second-order path)."""
    coeffs = coefficients(solver, stages, by_batch)

    def body(chunk, total):
        values = interpolate(y, coeffs, dt_rows, chunk.theta, by_batch)
        for v, g_full in zip(values, g_rows):
            g = chunk.take(g_full)
            total += tf.reduce_sum(tf.where(expand(chunk.valid, v), g * v, tf.zeros_like(v)))
        return (total,)

    (total,) = for_covered(ts_rows, lo, hi, t_rows, dt_rows, body,
                           (tf.zeros([], ts_rows.dtype),))
    return total

"""Where outputs come from: stepping onto them, or interpolating between the steps.

The loop (`_loop.integrate`) steps onto a list of times, the *stops*. This module decides
what they are and how the outputs are read (the idea of diffrax's `SaveAt`):

- `interpolate=False`: the stops are the output times; every output is a step's end
  (exact to the step's accuracy), and `len(ts) - 1` intervals cost at least as many
  steps.
- `interpolate=True` (the default): the stops are only the start and the last time, so
  the steps are chosen by error control alone, and each output is read from the
  continuous extension of the accepted step it falls in (`AbstractSolver.dense_weights`:
  fourth order for Dopri5 and Tsit5, cubic Hermite for the others), as torchdiffeq,
  TorchDiffEqPack, diffrax and TFP do. Outputs then cost no steps and no evaluations of
  `func`: one gather and a polynomial per output. With two times there is nothing to
  interpolate and the two modes are the same solve.

Times per sample (`ts` of shape `(batch, n)`, the state's leading axis being the batch)
are interpolated: one solve runs from the common start `ts[:, 0]` to the time farthest
from it, and sample `b` is read at its own `ts[b, :]`. A row may end in repeats of its
last time (padding for series with fewer observations): a repeated time gives the same
state as the one before it, and the caller (`_odeint`) cuts it from every gradient.

Reading outputs is vectorized after the loop (`evaluate`): each output time is located
among the accepted steps' starts by a binary search, and its polynomial evaluated from
that step's recorded coefficients. `pullback` is its transpose, for ACA's backward pass:
it turns the outputs' cotangents into cotangents on each step's start state and
coefficients (segment sums), and gives the output times' gradients through the
polynomial's derivative.
"""

from typing import Any, NamedTuple

import tensorflow as tf


class Plan(NamedTuple):
    """How a solve produces its outputs.

    Attributes:
        stops: 1-D times the loop steps onto (`ts` itself, or `[t0, t_end]`).
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
        last = tf.gather(ts, last_real(ts), batch_dims=1)
    if ts.shape.rank == 2 and per_sample:
        if not interpolate:
            return Plan(stops=ts, ts=None)
        return Plan(stops=tf.stack([ts[:, 0], last], axis=1), ts=ts[:, 1:])
    if ts.shape.rank == 2:
        t0 = common_start(ts)
        # The row whose last time lies farthest from the start ends the solve (the start
        # itself when none leaves it, or the batch is empty). The outputs at the end of
        # the solve take their time's gradient each through their own time (`evaluate`
        # extends the last state linearly), so rows that end there together each get
        # theirs; the rest of the end's gradient reaches that row's entry.
        ends = tf.concat([last, [t0]], 0)
        t_end = tf.gather(ends, tf.argmax(tf.abs(ends - t0)))
        return Plan(stops=tf.stack([t0, t_end]), ts=ts[:, 1:])
    if not interpolate or ts.shape[0] == 2:
        return Plan(stops=ts, ts=None)
    return Plan(stops=tf.stack([ts[0], ts[-1]]), ts=ts[1:])


def common_start(ts):
    """`ts[0, 0]` of 2-D times (every row starts there), and 0 for an empty batch."""
    return tf.reduce_sum(ts[:1, 0])


def last_real(ts):
    """`[batch]` int32: the index of each row's last time that is not a repeat."""
    new = tf.cast(tf.not_equal(ts[:, 1:], ts[:, :-1]), tf.int32)
    return tf.reduce_sum(new, axis=1)


def direction(plan):
    """+1 or -1: the sign of the solve's time direction, from its stops (never from the
    steps, which a solve that failed at once does not have)."""
    return tf.sign(tf.reduce_sum(plan.stops[..., -1] - plan.stops[..., 0]))


def locate(t, dt, num_steps, ts, sign):
    """The accepted step each output time lies in, and where in it.

    Args:
        t, dt: `[size]` step starts and sizes; entries past `num_steps` are unused
            (XLA's static buffers), entry `num_steps` is the end of the solve. With
            per-sample steps `[size, batch]`, and `ts` is then `[batch, n]`: sample
            `b` is searched among its own start times `t[:, b]`, non-decreasing, where
            the last entry at or before a time is the step that contains it (earlier
            entries with the same start are the sample's rejected trials or waits).
        num_steps: int32 scalar.
        ts: output times, `[n]` or `[batch, n]`.
        sign: the direction of time (`direction(plan)`).

    Returns:
        `(index, theta)` shaped like `ts`: the step `i` with `t[i] <= ts < t[i + 1]`
        (in the direction of time) and `theta = (ts - t[i]) / dt[i]` in `[0, 1)`; a time
        on the end of the solve gets `index = num_steps`, `theta = 0`.
    """
    used = tf.range(tf.shape(t)[0]) <= num_steps
    if t.shape.rank == 2:
        used = used[:, None]
    # Ascending keys for the binary search, whichever way time runs; unused entries last.
    keys = tf.where(used, sign * t, tf.constant(float("inf"), t.dtype))
    if t.shape.rank == 2:
        index = tf.searchsorted(tf.transpose(keys), sign * ts, side="right") - 1
        index = tf.clip_by_value(index, 0, num_steps)
        t_i = tf.gather(tf.transpose(t), index, batch_dims=1)
        dt_i = tf.gather(tf.transpose(dt), index, batch_dims=1)
        return index, (ts - t_i) / dt_i
    flat = tf.reshape(sign * ts, [-1])
    index = tf.searchsorted(keys, flat, side="right") - 1
    index = tf.reshape(tf.clip_by_value(index, 0, num_steps), tf.shape(ts))
    # `dt` of entry num_steps is 1: theta = 0 there, whatever the time.
    theta = (ts - tf.gather(t, index)) / tf.gather(dt, index)
    return index, theta


def _gather(x, index, per_sample):
    """`x[index]` for `[size, ...]` records; per sample, `x[index[b, k], b]`, laid out
    `[n, batch, ...]` (output axis first, as a solve's `ys`)."""
    if not per_sample:
        return tf.gather(x, index)
    index = tf.transpose(index)  # [n, batch]
    rows = tf.broadcast_to(tf.range(tf.shape(index)[1]), tf.shape(index))
    return tf.gather_nd(x, tf.stack([index, rows], axis=-1))


def _expand_like(theta, x, per_sample):
    """`theta` (`[n]` or `[batch, n]`) laid out `[n, (batch,) 1, ...]` to scale `x`."""
    if per_sample:
        theta = tf.transpose(theta)
    trailing = tf.ones([x.shape.rank - theta.shape.rank], tf.int32)
    return tf.reshape(theta, tf.concat([tf.shape(theta), trailing], 0))


def evaluate(checkpoints, ts, t_final, sign):
    """The solution at `ts` from the recorded steps: a flat list of `[n, ...]` tensors.

    Per sample (`ts` of shape `[batch, n]`), entry `[k, b]` is sample `b` at `ts[b, k]`.
    Outputs past `t_final` (a failed solve) are NaN, never a stale state. `sign`: the
    direction of time. Checkpoints of per-sample steps need `ts` of shape `[batch, n]`
    and `t_final` of shape `[batch]`.
    """
    cp = checkpoints
    per_sample = ts.shape.rank == 2
    index, theta = locate(cp.t, cp.dt, cp.num_steps, ts, sign)
    if t_final.shape.rank == 1:
        t_final = t_final[:, None]
    reached = sign * (ts - t_final) <= 0
    ys = []
    for y, c in zip(cp.y, cp.c):
        out = _gather(y, index, per_sample)
        th = _expand_like(theta, out, per_sample)
        degree = c.shape[1]
        # Horner's rule on theta * (c_1 + theta * (c_2 + ...)), each c_p gathered alone.
        poly = _gather(c[:, degree - 1], index, per_sample)
        for p in range(degree - 2, -1, -1):
            poly = _gather(c[:, p], index, per_sample) + th * poly
        out = out + th * poly
        nan = tf.constant(float("nan"), out.dtype)
        ys.append(tf.where(_expand_like(reached, out, per_sample), out, nan))
    return ys


def _segment_sum(values, index, size, per_sample):
    """Sums `values` (`[n, ...]`, or `[n, batch, ...]` per sample) into `[size, ...]` by
    the step each output lies in (per sample, by step and sample)."""
    if not per_sample:
        return tf.math.unsorted_segment_sum(values, index, size)
    index = tf.transpose(index)  # [n, batch], as values
    batch = tf.shape(index)[1]
    segments = index * batch + tf.range(batch)
    summed = tf.math.unsorted_segment_sum(values, segments, size * batch)
    return tf.reshape(summed, tf.concat([[size, batch], tf.shape(values)[2:]], 0))


def _inner(a, b, per_sample):
    """Inner products over the state axes: `[n]`, or `[n, batch]` per sample."""
    axes = list(range(2 if per_sample else 1, a.shape.rank))
    return tf.reduce_sum(a * b, axis=axes)


class Pullback(NamedTuple):
    """The outputs' cotangents carried back onto the recorded steps (see `pullback`)."""

    g_y: Any  # flat list of [size, ...]: on each step's start state
    g_c: Any  # flat list of [size, degree, ...]: on each step's coefficients
    g_t: Any  # [size] (per-sample steps: [size, batch]): on each step's start time
    g_dt: Any  # [size] (per-sample steps: [size, batch]): on each step's size
    g_ts: Any  # like ts: on the output times


def pullback(checkpoints, ts, g_ys, sign):
    """The transpose of `evaluate` for given output cotangents `g_ys`.

    An output is `y = y_i + sum_p theta^p c_{i,p}` with `theta = (ts - t_i) / dt_i`, so
    its cotangent `g` gives `g` on `y_i`, `theta^p g` on `c_{i,p}`, and, through
    `u = <g, dy/dtheta>`, `u / dt_i` on its time, `-u / dt_i` on `t_i` and
    `-u theta / dt_i` on `dt_i`. Summed per step (and per sample) with segment sums.
    """
    cp = checkpoints
    per_sample = ts.shape.rank == 2
    size = tf.shape(cp.t)[0]
    index, theta = locate(cp.t, cp.dt, cp.num_steps, ts, sign)
    g_y, g_c, u = [], [], 0.0
    for y, c, g in zip(cp.y, cp.c, g_ys):
        th = _expand_like(theta, g, per_sample)
        g_y.append(_segment_sum(g, index, size, per_sample))
        degree = c.shape[1]
        powers, power = [], th
        for _ in range(degree):
            powers.append(_segment_sum(power * g, index, size, per_sample))
            power = power * th
        # dy/dtheta = sum_p (p + 1) theta^p c_p, by Horner's rule.
        derivative = degree * _gather(c[:, degree - 1], index, per_sample)
        for p in range(degree - 2, -1, -1):
            derivative = (p + 1) * _gather(c[:, p], index, per_sample) + th * derivative
        g_c.append(tf.stack(powers, axis=1))
        u += _inner(g, derivative, per_sample)
    if per_sample:
        u = tf.transpose(u)  # [batch, n], as ts
    if cp.t.shape.rank == 2:  # per-sample steps: [size, batch]
        dt = tf.gather(tf.transpose(cp.dt), index, batch_dims=1)
        transposed = lambda x: tf.transpose(x)[..., None]  # noqa: E731  [n, batch, 1]
        g_t = _segment_sum(transposed(-u / dt), index, size, True)[..., 0]
        g_dt = _segment_sum(transposed(-u * theta / dt), index, size, True)[..., 0]
        return Pullback(g_y=g_y, g_c=g_c, g_t=g_t, g_dt=g_dt, g_ts=u / dt)
    dt = tf.gather(cp.dt, index)
    flat = tf.reshape(index, [-1])
    g_t = tf.math.unsorted_segment_sum(tf.reshape(-u / dt, [-1]), flat, size)
    g_dt = tf.math.unsorted_segment_sum(tf.reshape(-u * theta / dt, [-1]), flat, size)
    return Pullback(g_y=g_y, g_c=g_c, g_t=g_t, g_dt=g_dt, g_ts=u / dt)

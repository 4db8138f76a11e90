"""What the replaying strategies (ACA, MALI) share: the stops and the outputs laid out by
groups (`_loop.Groups`) and rows (`_outputs`), and where an entry's time gradients go."""

from typing import Any, NamedTuple

import tensorflow as tf

from tfaca import _outputs
from tfaca._loop import Groups


class Setting(NamedTuple):
    """What one replay entry needs besides the entry: the stops and the outputs, laid out
    by groups and rows."""

    groups: Any  # _loop.Groups
    stops: Any  # [G, S]
    dense: bool
    ts_rows: Any  # [R, n] output times, the start included (dense), else None
    keys: Any  # sign * ts_rows
    sign: Any
    by_batch: bool
    g_rows: Any  # output cotangents laid out [R, n, ...] (dense), else the g_ys
    jumps: Any = None  # [G, S] bool: the stops where `func` jumps (`_loop.integrate`), or None


def setting_of(times, g_ys, per_sample, y0, jumps=None):
    groups = Groups(shared=not per_sample)
    stops = times[0]
    stops = stops[None] if stops.shape.rank == 1 else stops
    if per_sample:
        stops = tf.broadcast_to(stops, tf.stack([tf.shape(y0[0])[0], tf.shape(stops)[1]]))
    if jumps is not None:
        jumps = tf.broadcast_to(jumps[None] if jumps.shape.rank == 1 else jumps, tf.shape(stops))
    sign = tf.sign(tf.reduce_sum(stops[:, -1] - stops[:, 0]))
    if len(times) == 1:
        return Setting(groups, stops, False, None, None, sign, per_sample, g_ys, jumps)
    ts_rows, by_batch = _outputs.output_rows(_outputs.Plan(stops, times[1]), per_sample,
                                             tf.shape(y0[0])[0])
    return Setting(groups, stops, True, ts_rows, sign * ts_rows, sign, by_batch,
                   _outputs.cotangent_rows(g_ys, by_batch), jumps)


def jumped(setting, cp, i):
    """`[G]`: the groups whose entry `i` (accepted) landed on a jump (none for `i < 0`)."""
    k = tf.maximum(i, 0)
    hit = tf.gather(cp.hit, k) & tf.gather(cp.accepted, k) & (i >= 0)
    return hit & _outputs.at_stop(setting.jumps, tf.gather(cp.interval, k))


def onto_stops(setting, g_stops, j, hit, g_t, g_dt):
    """Adds a replayed entry's time gradients onto the stops: a step starts at
    `t_i = stops[j - 1] + offset`, and the one that lands (`hit`) has
    `dt = stops[j] - t_i`. A group that is done has passed its last stop (`j` is the
    number of stops): its time is that stop."""
    num_stops = tf.shape(setting.stops)[1]
    g_dt = tf.where(hit, g_dt, tf.zeros_like(g_dt))
    rows = tf.range(tf.shape(j)[0])
    before = tf.clip_by_value(j, 1, num_stops) - 1
    after = tf.clip_by_value(j, 1, num_stops - 1)
    where = tf.concat([tf.stack([rows, before], 1), tf.stack([rows, after], 1)], 0)
    return tf.tensor_scatter_nd_add(g_stops, where, tf.concat([g_t - g_dt, g_dt], 0))


def covered(setting, cp, i):
    """`(lo, hi, t_rows, dt_rows)`: the outputs `lo <= k < hi` inside entry `i` (`[R]`)."""
    t, dt = (to_rows(setting, tf.gather(x, i)) for x in (cp.t, cp.dt))
    # Entry `i + 1` exists but for `i = 0` in a solve of no step (ACA's `_sums_of(-1)`).
    end = tf.gather(cp.t, tf.minimum(i + 1, tf.shape(cp.t)[0] - 1))
    lo = _outputs.count_through(setting.keys, t, setting.sign)
    hi = _outputs.count_through(setting.keys, to_rows(setting, end), setting.sign)
    return lo, hi, t, dt


def to_rows(setting, v):
    """A `[G]` tensor as `[R]` (shared steps with outputs by rows: broadcast)."""
    if setting.groups.shared:
        return tf.broadcast_to(v, tf.shape(setting.ts_rows)[:1])
    return v


def to_groups(setting, v):
    """The transpose of `_to_rows`: `[R]` summed onto `[G]`."""
    return tf.reshape(tf.reduce_sum(v), [1]) if setting.groups.shared else v


def add_landed(setting, a, j, hit):
    """`a` plus, for the groups whose step landed on stop `j` (`hit`), that stop's output
    cotangent (read with `tf.gather`, never `g[j]`: see `_jit`)."""
    groups = setting.groups
    out = []
    for a_n, g in zip(a, setting.g_rows):
        if groups.shared:
            landed = tf.gather(g, j)[0]
        else:
            landed = tf.gather_nd(g, tf.stack([tf.minimum(j, tf.shape(g)[0] - 1),
                                               tf.range(tf.shape(j)[0])], 1))
        out.append(a_n + tf.where(groups.spread(hit, a_n), landed, tf.zeros_like(a_n)))
    return out


def group_dot(groups, xs, ys):
    """`[G]` inner products of each group's part of `xs` and `ys`."""
    out = 0.0
    for x, y in zip(xs, ys):
        axes = list(range(0 if groups.shared else 1, x.shape.rank))
        out += tf.reduce_sum(x * y, axis=axes) if axes else x * y
    return groups.grouped(out) if groups.shared else out

"""Events: where a condition of the solution crosses zero, found on the accepted steps'
interpolants; a terminal event ends the solve there, and its time and state are
differentiable (the implicit function theorem at the crossing, composed with the gradient
strategy's own gradient of the state at a fixed time).

*Lanes.* A condition returns a scalar, or one value per sample (`(batch,)`, the state's
leading axis being the batch): the *lanes*, `E` of them, each with its own event. With
per-sample steps a lane is a group of the loop (`_loop.Groups`), which stops at its
event; with shared steps, every lane's event is found inside the shared steps, and the
solve stops once every lane has had its own (a lane that has fired keeps being
integrated with the others, its outputs after the event being its event state).

*Detection* (`detect`, in the loop, after every accepted step): the condition is
evaluated at the step's end and at `INTERIOR` points of its interpolant, so that a pair of
crossings inside one step (a condition that dips below zero and back) is seen; the first
sub-interval whose ends have a sign change in the event's direction brackets the root.
*Root finding* (`_root`): the Illinois variant of regula falsi on the interpolant, a
bisection every fourth iteration, until the bracket is a few ulps of time wide, so the
event time is the crossing of the interpolant to rounding. A sign change needs a strictly
signed start: a condition that is zero where a step starts (a ball on the ground at the
start) does not fire until it has left zero and crossed again.

*Gradients* (`differentiable`): the strategy returns the event state `y*` as the state at
the fixed time `t*` (ACA replays the event's step and pulls its cotangent back through the
same interpolant, `_aca`; naive backpropagation differentiates the loop). The event time
then follows from `g(t*, y(t*)) = 0`: `dt* = -(dg/dtheta + dg/dy dy/dtheta) / (dg/dt +
dg/dy y')` with `y'` the interpolant's derivative at `t*` (what the root is a root of), and
`dy* = dy(t*) + y' dt*`. Both are written as one Newton step of zero size, so that every
input of `g` and of `y(t*)` gets its gradient from TensorFlow's own differentiation.
"""

import numbers
from typing import Any, NamedTuple

import tensorflow as tf

from tfaca import _outputs

# Interior points of each step at which the condition is checked, besides its ends.
INTERIOR = 3
# Root-finding iterations at most (a bisection every fourth: < 4 x 64 halvings needed).
_MAX_ITERATIONS = 256


class Event:
    """A condition whose zero crossing a solve detects, by default ending the solve there.

    Args:
        condition: `condition(t, y, *args) -> value`: a scalar, or one value per sample
            (`(batch,)`, the state's leading axis being the batch); or a tuple of such
            values for several conditions, the first to cross being the event
            (`Solution.event_index` says which). `t` is a scalar, or `(batch,)` where
            samples are at their own times (per-sample steps, and the search for each
            sample's crossing inside a shared step): write conditions that broadcast it.
            Variables it reads and `args` receive gradients through the event.
        direction: which crossings count: `1` rising (from negative to zero or
            positive), `-1` falling, `0` (default) both; or a tuple, one per condition.
        terminal: True (default): the event ends the solve. Only terminal events are
            supported.

    A crossing needs a strictly signed start: a condition that is zero at the start of
    the solve does not fire until it has left zero and crossed again.
    """

    def __init__(self, condition, direction=0, terminal=True):
        if not callable(condition):
            raise TypeError(f"`condition` must be callable. Received: condition={condition!r}")
        directions = direction if isinstance(direction, (tuple, list)) else (direction,)
        if not directions or not all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) and d in (-1, 0, 1)
                for d in directions):
            raise ValueError(
                "`direction` must be 1 (rising), -1 (falling) or 0 (both), or a tuple of "
                f"them, one per condition. Received: direction={direction!r}")
        if terminal is not True:
            raise ValueError(
                "`terminal` must be True: tfaca's events end the solve (non-terminal events, "
                f"recording crossings and going on, are not supported). Received: "
                f"terminal={terminal!r}")
        self.condition = condition
        self.direction = tuple(int(d) for d in directions) if isinstance(
            direction, (tuple, list)) else int(direction)
        self.terminal = True

    def __repr__(self):
        name = getattr(self.condition, "__name__", repr(self.condition))
        return f"Event({name}, direction={self.direction!r})"


class Detector(NamedTuple):
    """An `Event` as the loop uses it (static: hashable, no tensors)."""

    condition: Any  # condition(t, y_flat, args_flat) -> [C, E]
    directions: tuple  # C ints
    by_batch: bool  # lanes are the state's batch rows (E = batch), else E = 1
    args: Any = None  # the args the condition is evaluated with, bound by `bind`

    def bind(self, args):
        return self._replace(args=args)

    def values(self, t, y):
        return self.condition(t, y, self.args)


class Found(NamedTuple):
    """The loop's event state, per lane (`[E]`), and the states laid out by rows
    (`[R, ...]`, `R = E` or 1, `_outputs.rows`)."""

    g: Any  # [C, E]: the conditions where each lane is now
    t: Any  # [E]: the event time (where no event: 0)
    y: Any  # per component [R, ...]: the state there (the interpolant's)
    slope: Any  # per component [R, ...]: the interpolant's time derivative there
    index: Any  # [E] int32: which condition fired, -1 for none (yet)
    entry: Any  # [E] int32: the checkpoint entry of the step it lies in (ACA's replay)


def start(g0, t0, y0, by_batch, lanes_of):
    """The `Found` of a solve at `(t0, y0)` (`[G]` times) whose conditions are `g0`
    (`[C, E]`) there: nothing fired."""
    e = tf.shape(g0)[1]
    rows = [_outputs.rows(y, by_batch) for y in y0]
    return Found(g=g0, t=lanes_of(t0, e), y=[tf.zeros_like(r) for r in rows],
                 slope=[tf.zeros_like(r) for r in rows], index=-tf.ones([e], tf.int32),
                 entry=-tf.ones([e], tf.int32))


def _crossed(g, rising):
    """Whether `g` is past the crossing, searching from a start below zero (`rising`) or
    above it."""
    return tf.where(rising, g >= 0, g <= 0)


def _crossings(before, after, directions):
    """`[C, E]`: a sign change from `before` to `after` in each condition's direction."""
    d = tf.constant(directions, before.dtype)[:, None]
    up = (before < 0) & (after >= 0) & (d >= 0)
    down = (before > 0) & (after <= 0) & (d <= 0)
    return up | down


def detect(detector, solver, s_found, *, t, dt, y, y1, stages, accept, entry, lanes_of,
           lane_time, few_ulps):
    """The `Found` after a trial from `(t, y)` of size `dt` (`[G]`) with stages `stages`
    (those of its interpolant) and end `y1`, and `[E]` which lanes fired in it.

    `lanes_of(v, e)`: a `[G]` tensor as `[E]`; `lane_time(t_e)`: lane times as the
    condition takes them."""
    found = s_found
    by_batch = detector.by_batch
    num = tf.shape(found.g)[1]
    accepted = lanes_of(accept, num)
    live = accepted & (found.index < 0)
    t_e, dt_e = lanes_of(t, num), lanes_of(dt, num)
    dt_rows = dt_e if by_batch else dt_e[:1]
    coeffs = _outputs.coefficients(solver, stages, by_batch)

    def state_at(theta):
        """The interpolant at `theta` (`[E]`): per component, the state laid out as `y`."""
        th = theta if by_batch else theta[:1]
        values = _outputs.interpolate(y, coeffs, dt_rows, th[:, None], by_batch)
        return [_outputs.unrows(v[:, 0], by_batch) for v in values]

    def values_at(theta):
        return detector.values(lane_time(t_e + theta * dt_e), state_at(theta))

    def check():
        """The conditions along the step, and the search for a crossing if any."""
        points = [found.g]
        for p in range(1, INTERIOR + 1):
            points.append(values_at(tf.fill([num], tf.cast(p / (INTERIOR + 1), t.dtype))))
        g_end = detector.values(lane_time(t_e + dt_e), y1)
        points.append(g_end)
        table = tf.stack(points)  # [P, C, E]
        crossing = _crossings(table[:-1], table[1:], detector.directions) & live[None, None]
        g_now = tf.where(accepted[None], g_end, found.g)

        def search():
            has = tf.reduce_any(crossing, axis=0)  # [C, E]
            first = tf.argmax(tf.cast(crossing, tf.int32), axis=0, output_type=tf.int32)
            parts = tf.cast(INTERIOR + 1, t.dtype)
            lo, hi = tf.cast(first, t.dtype) / parts, tf.cast(first + 1, t.dtype) / parts
            by_point = tf.transpose(table, [1, 2, 0])  # [C, E, P]
            g_lo = tf.gather(by_point, first[..., None], batch_dims=2)[..., 0]
            g_hi = tf.gather(by_point, first[..., None] + 1, batch_dims=2)[..., 0]
            theta = _root(values_at, lo, hi, g_lo, g_hi, has, tf.abs(dt_e),
                          few_ulps(tf.maximum(tf.abs(t_e), tf.abs(t_e + dt_e))))
            # The first condition to cross wins.
            theta = tf.where(has, theta, tf.constant(float("inf"), t.dtype))
            index = tf.argmin(theta, axis=0, output_type=tf.int32)
            theta_star = tf.reduce_min(theta, axis=0)
            fired = tf.reduce_any(has, axis=0)
            theta_star = tf.where(fired, theta_star, tf.zeros_like(theta_star))
            t_star = tf.stop_gradient(t_e + theta_star * dt_e)
            # The state at the fixed time t*: a function of the step (naive backpropagation
            # through the loop differentiates it, as ACA's replay does), not of the root. Its
            # value is the one the root finder judged past the crossing (theta* itself, not
            # theta* rounded through t*), so that a solve restarted from it does not find the
            # same crossing again.
            safe_dt = tf.where(tf.equal(dt_e, 0), tf.ones_like(dt_e), dt_e)
            at = (t_star - t_e) / safe_dt
            at = tf.where(fired, theta_star + (at - tf.stop_gradient(at)), tf.zeros_like(t_e))
            at_rows = at if by_batch else at[:1]
            values = _outputs.interpolate(y, coeffs, dt_rows, at_rows[:, None], by_batch)
            rates = _rates(coeffs, at_rows)
            keep = lambda new, old: tf.where(  # noqa: E731
                _outputs.expand((fired if by_batch else fired[:1])[:, None], new[:, None])[:, 0],
                new, old)
            return Found(
                g=g_now, t=tf.where(fired, t_star, found.t),
                y=[keep(v[:, 0], old) for v, old in zip(values, found.y)],
                slope=[keep(tf.reshape(r, tf.shape(old)), old) for r, old in zip(rates, found.slope)],
                index=tf.where(fired, index, found.index),
                entry=tf.where(fired, entry * tf.ones_like(found.entry), found.entry),
            ), fired

        def nothing():
            return found._replace(g=g_now), tf.zeros_like(live)

        return tf.cond(tf.reduce_any(crossing), search, nothing)

    # Nothing to check where no lane that has not fired accepted its trial.
    return tf.cond(tf.reduce_any(live), check, lambda: (found, tf.zeros_like(live)))


def _rates(coeffs, theta_rows):
    """The interpolant's time derivative at `theta_rows` (`[R]`), `sum_p (p + 1) theta^p
    c_p`, per component `[R, elements]`."""
    out = []
    for c in coeffs:
        weights = _outputs.powers(theta_rows[:, None], c.shape[1], derivative=True)  # [R,1,deg]
        out.append(tf.matmul(weights, c)[:, 0])
    return out


def _root(values_at, lo, hi, g_lo, g_hi, has, span, tolerance):
    """The crossing of each condition (`[C, E]` brackets `lo < hi` of theta with values
    `g_lo`, `g_hi` of opposite signs) on the interpolant, `values_at(theta [E]) -> [C, E]`:
    the Illinois method with a bisection every fourth iteration, until each bracket is at
    most `tolerance` (`[E]`, time) wide over a step of `span` (`[E]`, |dt|). Returns the
    bracket's end past the crossing (`[C, E]`), where the condition has crossed."""
    rising = g_lo < 0
    num_conditions = lo.shape[0]

    def converged(lo, hi):
        return ~has | ((hi - lo) * span[None] <= tolerance[None])

    def body(i, lo, hi, g_lo, g_hi, side):
        secant = (lo * g_hi - hi * g_lo) / (g_hi - g_lo)
        inside = (secant > lo) & (secant < hi) & tf.math.is_finite(secant)
        mid = 0.5 * (lo + hi)
        theta = tf.where(inside & (i % 4 != 3), secant, mid)
        theta = tf.where(converged(lo, hi), hi, theta)
        # Each condition at its own theta (one evaluation of all of them per condition).
        g = tf.stack([values_at(theta[c])[c] for c in range(num_conditions)])
        past = _crossed(g, rising)
        # Illinois: an end kept twice in a row has its value halved.
        g_hi_new = tf.where(past, g, tf.where(side < 0, 0.5 * g_hi, g_hi))
        g_lo_new = tf.where(past, tf.where(side > 0, 0.5 * g_lo, g_lo), g)
        exact = tf.equal(g, 0)
        done = converged(lo, hi)
        lo_new = tf.where(done, lo, tf.where(past, lo, theta))
        hi_new = tf.where(done, hi, tf.where(past | exact, theta, hi))
        lo_new = tf.where(exact & ~done, theta, lo_new)
        side_new = tf.where(past, 1, -1)
        return (i + 1, lo_new, hi_new, tf.where(done, g_lo, g_lo_new),
                tf.where(done, g_hi, g_hi_new), tf.where(done, side, side_new))

    _, lo, hi, _, _, _ = tf.while_loop(
        lambda i, lo, hi, *_: tf.reduce_any(~converged(lo, hi)), body,
        (tf.constant(0, tf.int32), lo, hi, g_lo, g_hi, tf.zeros_like(lo, tf.int32)),
        maximum_iterations=_MAX_ITERATIONS)
    return tf.stop_gradient(hi)


def detector(event, y0, y0_flat, args, num_hidden, t0, per_sample, dtype):
    """The `Detector` of `event` for a solve from `(t0, y0)`: its condition evaluated once
    there, checked, and wrapped as `condition(t, y_flat, args_flat) -> [C, E]`. The
    solve's flat args hold `num_hidden` entries before the user's `args` (a control
    path's tensors), which the condition does not see."""
    if not isinstance(event, Event):
        raise TypeError(f"`event` must be a tfaca.Event. Received: event={event!r}")
    if per_sample:
        t0 = tf.broadcast_to(t0, tf.shape(y0_flat[0])[:1])
    values = _as_tuple(event.condition(t0, y0, *args))
    ranks = {tf.convert_to_tensor(v).shape.rank for v in values}
    if not values or not ranks <= {0, 1}:
        raise ValueError(
            "`event`'s condition must return a scalar or one value per sample (batch,), or "
            "a tuple of them. Received: shapes "
            f"{[tf.convert_to_tensor(v).shape for v in values]}")
    by_batch = bool(per_sample) or 1 in ranks
    if by_batch:
        length = next(tf.convert_to_tensor(v).shape[0] for v in values
                      if tf.convert_to_tensor(v).shape.rank == 1) if 1 in ranks else None
        for y in y0_flat:
            if y.shape.rank == 0 or not y.shape[:1].is_compatible_with([length]):
                raise ValueError(
                    "`event`'s condition returns one value per sample, (batch,): every "
                    "component of the state must have the batch as its leading axis. "
                    f"Received: a condition of shape ({length},) and state components of "
                    f"shapes {[x.shape for x in y0_flat]}")
    directions = event.direction if isinstance(event.direction, tuple) else (
        (event.direction,) * len(values))
    if len(directions) != len(values):
        raise ValueError(
            f"`direction` must give one direction per condition: the condition returns "
            f"{len(values)}. Received: direction={event.direction!r}")

    def condition(t, y_flat, args_flat):
        y = tf.nest.pack_sequence_as(y0, y_flat)
        user_args = tf.nest.pack_sequence_as(args, list(args_flat)[num_hidden:]) if args else ()
        out = []
        for v in _as_tuple(event.condition(t, y, *user_args)):
            v = tf.cast(v, dtype)
            out.append(tf.broadcast_to(v, tf.shape(y_flat[0])[:1]) if by_batch
                       else tf.reshape(v, [1]))
        return tf.stack(out)

    return Detector(condition=condition, directions=tuple(directions), by_batch=by_batch)


def _as_tuple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


class Outcome(NamedTuple):
    """What a solve returns about its event: per lane (a scalar condition's as scalars)."""

    t: Any
    y: Any  # flat, state layout
    index: Any


def finish(detector, found, ys, ts, t_end, per_sample_times, args):
    """`(ys, Outcome)`: the outputs with those past each lane's event replaced by its event
    state, and the event's time, state and condition, differentiable (see the module
    docstring). A lane without an event reports where the solve ended: `t_end` (`[E]`,
    its last output time) and its last output, with index -1.

    `ys`: flat outputs, `[n, ...]` (`[n, batch, ...]` with `per_sample_times`, `ts`
    then `[batch, n]`); `found`: the loop's `Found`, its states differentiable."""
    by_batch = detector.by_batch
    fired = found.index >= 0
    t_star = tf.stop_gradient(found.t)
    states = [_outputs.unrows(y, by_batch) for y in found.y]
    slopes = [tf.stop_gradient(_outputs.unrows(tf.reshape(s, tf.shape(y)), by_batch))
              for s, y in zip(found.slope, found.y)]
    lane_t = (lambda t: t) if by_batch else (lambda t: t[0])
    t_lane = lane_t(t_star)
    bound = detector.bind(args)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([t_lane, *states])
        g = bound.values(t_lane, states)
        each = tf.unstack(g)
    # dg/dt + dg/dy y' per condition and lane: the rate at which each crosses.
    rates = []
    for c in range(len(detector.directions)):
        g_t, g_y = tape.gradient(each[c], [t_lane, states],
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
        along = tf.add_n([tf.reduce_sum(tf.reshape(_outputs.rows(d * s, by_batch),
                                                   [tf.shape(f)[0], -1]), axis=1)
                          for d, s, f in zip(g_y, slopes, found.y)])
        rates.append(g_t + along if by_batch else tf.reshape(g_t, [1]) + along)
    rate = tf.stack(rates)
    index = tf.maximum(found.index, 0)
    pick = lambda x: tf.gather(tf.transpose(x), index[:, None], batch_dims=1)[:, 0]  # noqa: E731
    g_at, rate_at = pick(g), tf.stop_gradient(pick(rate))
    # One Newton step of size zero: the value stays t*, the gradient is the implicit one.
    rate_at = tf.where(fired & tf.not_equal(rate_at, 0), rate_at, tf.ones_like(rate_at))
    t_event = t_star - tf.where(fired, g_at - tf.stop_gradient(g_at), tf.zeros_like(g_at)) / rate_at
    moved = t_event - tf.stop_gradient(t_event)
    rows_fired = fired if by_batch else fired[:1]

    def per_lane(v, x):
        """`[E]` (`[1]` when not by batch) laid out to broadcast over the state `x`."""
        v = v if by_batch else v[0]
        return tf.reshape(v, [-1] + [1] * (x.shape.rank - 1)) if by_batch else v

    last = [_last_output(y, ts, per_sample_times) for y in ys]
    event_y = [tf.where(per_lane(rows_fired, y), y + per_lane(moved, y) * s, end)
               for y, s, end in zip(states, slopes, last)]
    event_t = tf.where(fired, t_event, t_end)
    # The outputs past each lane's event are its event state.
    if per_sample_times:
        sign = tf.sign(tf.reduce_sum(ts[:, -1] - ts[:, 0]))
        past = tf.transpose(sign * (ts - t_star[:, None]) > 0)  # [n, batch]
    else:
        sign = tf.sign(ts[-1] - ts[0])
        past = sign * (ts[:, None] - t_star[None]) > 0  # [n, E]
    past &= fired[None]
    out = []
    for y, e in zip(ys, event_y):
        mask = past if by_batch else past[:, 0]
        mask = tf.reshape(mask, tf.concat([tf.shape(mask), [1] * (y.shape.rank - mask.shape.rank)],
                                          0))
        out.append(tf.where(mask, e[None], y))
    if not by_batch:
        event_t, index = event_t[0], found.index[0]
    else:
        index = found.index
    return out, Outcome(t=event_t, y=event_y, index=index)


def _last_output(y, ts, per_sample_times):
    """The output at each lane's last time: `y[-1]`, or per sample its last real time."""
    if not per_sample_times:
        return y[-1]
    rows = tf.transpose(y, [1, 0] + list(range(2, y.shape.rank)))
    return tf.gather(rows, _outputs.last_real(ts), batch_dims=1)

"""Events: where a condition of the solution crosses zero, found on the accepted steps'
interpolants; a terminal event ends the solve there, and the events' times and states are
differentiable (the implicit function theorem at the crossing, composed with the gradient
strategy's own gradient of the state at a fixed time).

*Lanes.* A condition returns a scalar, or one value per sample (`(batch,)`, the state's
leading axis being the batch): the *lanes*, `E` of them, each with its own events. With
per-sample steps a lane is a group of the loop (`_loop.Groups`), which stops at its
event; with shared steps, every lane's events are found inside the shared steps, and the
solve stops once every lane's terminal event has come (a lane that has ended keeps being
integrated with the others, its outputs after the event being its event state).

*Slots.* Each lane records its first `K` crossings (`Event(max_events=K)`, 1 by default),
in `[K, E]` tensors: a static shape, under XLA too. A terminal event ends a lane at its
`K`-th crossing; a non-terminal one records up to `K` and goes on.

*Detection* (`detect`, in the loop, after every accepted step): the condition is
evaluated at the step's end and at `INTERIOR` points of its interpolant, so that a pair of
crossings inside one step (a condition that dips below zero and back) is seen; the first
sub-interval whose ends have a sign change in the event's direction brackets the root,
and with slots left the search goes on from that crossing to the step's end.
*Root finding* (`_root`): the Illinois variant of regula falsi on the interpolant, a
bisection every fourth iteration, until the bracket is a few ulps of time wide, so the
event time is the crossing of the interpolant to rounding. A sign change needs a strictly
signed start: a condition that is zero where a step starts (a ball on the ground at the
start) does not fire until it has left zero and crossed again.

*Gradients* (`finish`, `_implicit`): the strategy returns each event's state `y*` as the
state at the fixed time `t*` (ACA replays the event's step and pulls its cotangent back
through the same interpolant, `_aca._event_term`; naive backpropagation differentiates
the loop, where only that interpolation depends on the step). The event time then follows
from `g(t*, y(t*)) = 0`: `dt* = -(dg/dtheta + dg/dy dy/dtheta) / (dg/dt + dg/dy y')` with
`y'` the interpolant's derivative at `t*` (what the root is a root of), and `dy* = dy(t*)
+ y' dt*`. Both are written as one Newton step of zero size, so that every input of `g`
and of `y(t*)` gets its gradient from TensorFlow's own differentiation.
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
    """A condition whose zero crossings a solve detects, by default ending it at the first.

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
        terminal: True (default): the solve ends at the event (at the `max_events`-th
            crossing when given). False: the solve goes on to its last time, recording
            up to `max_events` crossings.
        max_events: None (default): one event, reported without an axis for it. A
            positive int `K`: the first `K` crossings of each sample are recorded
            (`Solution.event_t` then has a trailing axis of `K`, the state one after
            the batch axis; a slot without a crossing reports the end of the solve, and
            index -1). Needed with `terminal=False`.

    A crossing needs a strictly signed start: a condition that is zero at the start of
    the solve (or at a crossing just recorded) does not fire until it has left zero and
    crossed again.
    """

    def __init__(self, condition, direction=0, terminal=True, max_events=None):
        if not callable(condition):
            raise TypeError(f"`condition` must be callable. Received: condition={condition!r}")
        directions = direction if isinstance(direction, (tuple, list)) else (direction,)
        if not directions or not all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) and d in (-1, 0, 1)
                for d in directions):
            raise ValueError(
                "`direction` must be 1 (rising), -1 (falling) or 0 (both), or a tuple of "
                f"them, one per condition. Received: direction={direction!r}")
        if not isinstance(terminal, bool):
            raise ValueError(f"`terminal` must be True or False. Received: terminal={terminal!r}")
        if max_events is not None and (
                not isinstance(max_events, numbers.Integral) or isinstance(max_events, bool)
                or max_events < 1):
            raise ValueError(
                "`max_events` must be None or a positive int, the number of crossings to "
                f"record. Received: max_events={max_events!r}")
        if not terminal and max_events is None:
            raise ValueError(
                "`terminal=False` records crossings as the solve goes on, into a fixed "
                "number of slots: give `max_events`. Received: max_events=None")
        self.condition = condition
        self.direction = tuple(int(d) for d in directions) if isinstance(
            direction, (tuple, list)) else int(direction)
        self.terminal = terminal
        self.max_events = None if max_events is None else int(max_events)

    def __repr__(self):
        name = getattr(self.condition, "__name__", repr(self.condition))
        return (f"Event({name}, direction={self.direction!r}, terminal={self.terminal}, "
                f"max_events={self.max_events})")


class Detector(NamedTuple):
    """An `Event` as the loop uses it (static: hashable, no tensors)."""

    condition: Any  # condition(t, y_flat, args_flat) -> [C, E]
    directions: tuple  # C ints
    by_batch: bool  # lanes are the state's batch rows (E = batch), else E = 1
    slots: int = 1  # K: the crossings recorded per lane
    terminal: bool = True  # the K-th crossing ends the lane's solve
    args: Any = None  # the args the condition is evaluated with, bound by `bind`

    def bind(self, args):
        return self._replace(args=args)

    def values(self, t, y):
        return self.condition(t, y, self.args)

    def ended(self, found):
        """`[E]`: the lanes whose solve the event has ended."""
        if not self.terminal:
            return tf.zeros_like(found.count, tf.bool)
        return found.count >= self.slots


class Found(NamedTuple):
    """The loop's event state: `K` slots per lane (`[K, E]`), the states laid out by rows
    (`[K, R, ...]`, `R = E` or 1, `_outputs.rows`)."""

    g: Any  # [C, E]: the conditions where each lane is now
    t: Any  # [K, E]: the event times (where none: the start)
    y: Any  # per component [K, R, ...]: the states there (the interpolant's)
    slope: Any  # per component [K, R, ...]: the interpolant's time derivative there
    index: Any  # [K, E] int32: which condition fired, -1 for none (yet)
    entry: Any  # [K, E] int32: the checkpoint entry of the step it lies in (ACA's replay)
    count: Any  # [E] int32: the slots filled


def lanes_of(groups):
    """`lanes(v, e)`: a `[G]` tensor of the loop's groups (`_loop.Groups`) as an event's
    `[E]` lanes: itself per sample, the one group's value broadcast when shared."""
    return (lambda v, e: v) if not groups.shared else (lambda v, e: tf.broadcast_to(v, [e]))


def start(g0, t0, y0, by_batch, lanes_of, slots):
    """The `Found` of a solve at `(t0, y0)` (`[G]` times) whose conditions are `g0`
    (`[C, E]`) there: nothing fired."""
    e = tf.shape(g0)[1]
    rows = [tf.zeros_like(_outputs.rows(y, by_batch))[None] for y in y0]
    rows = [tf.tile(r, [slots] + [1] * (r.shape.rank - 1)) for r in rows]
    none = -tf.ones([slots, e], tf.int32)
    return Found(g=g0, t=tf.tile(lanes_of(t0, e)[None], [slots, 1]), y=rows,
                 slope=[tf.zeros_like(r) for r in rows], index=none, entry=none,
                 count=tf.zeros([e], tf.int32))


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
    (those of its interpolant) and end `y1`: the crossings inside it recorded in the
    lanes' next slots, first to last (several per step where the condition crosses
    several times and slots are left).

    Finding them (`tf.cond`, loops) reads the step as a constant; only the states
    recorded are a function of it, computed outside any control flow, so that
    backpropagating through the loop (the naive gradient, also under XLA) differentiates
    an interpolation and nothing else.

    `lanes_of(v, e)`: a `[G]` tensor as `[E]`; `lane_time(t_e)`: lane times as the
    condition takes them."""
    found = s_found
    by_batch, slots = detector.by_batch, detector.slots
    num = tf.shape(found.g)[1]
    accepted = lanes_of(accept, num)
    live = accepted & (found.count < slots)
    t_e, dt_e = lanes_of(t, num), lanes_of(dt, num)
    dt_rows = dt_e if by_batch else dt_e[:1]
    coeffs = _outputs.coefficients(solver, stages, by_batch)
    parts = INTERIOR + 1
    # The search's view of the step: constants.
    at_t, at_dt = tf.stop_gradient(t_e), tf.stop_gradient(dt_e)
    fixed_y, fixed_coeffs = [tf.stop_gradient(v) for v in y], [tf.stop_gradient(c) for c in coeffs]
    fixed_rows = tf.stop_gradient(dt_rows)

    def values_at(theta):
        """The conditions on the interpolant at `theta` (`[E]`): `[C, E]`."""
        th = theta if by_batch else theta[:1]
        values = _outputs.interpolate(fixed_y, fixed_coeffs, fixed_rows, th[:, None], by_batch)
        state = [_outputs.unrows(v[:, 0], by_batch) for v in values]
        return detector.values(lane_time(at_t + theta * at_dt), state)

    g_end = detector.values(lane_time(at_t + at_dt), [tf.stop_gradient(v) for v in y1])

    def next_crossing(theta_0, g_0, more):
        """The first crossing after `theta_0` (`[E]`, where the conditions are `g_0`) in
        the lanes `more`: `(theta*, index, fired)`, `[E]` each. The conditions are
        checked at `INTERIOR` points of `(theta_0, 1)` and at its end (`g_end`)."""
        fraction = lambda p: theta_0 + (p / parts) * (1 - theta_0)  # noqa: E731
        table = tf.stack([g_0] + [values_at(fraction(p)) for p in range(1, parts)] + [g_end])
        crossing = _crossings(table[:-1], table[1:], detector.directions) & more[None, None]

        def search():
            has = tf.reduce_any(crossing, axis=0)  # [C, E]
            first = tf.argmax(tf.cast(crossing, tf.int32), axis=0, output_type=tf.int32)
            lo, hi = fraction(tf.cast(first, t.dtype)), fraction(tf.cast(first + 1, t.dtype))
            by_point = tf.transpose(table, [1, 2, 0])  # [C, E, P]
            g_lo = tf.gather(by_point, first[..., None], batch_dims=2)[..., 0]
            g_hi = tf.gather(by_point, first[..., None] + 1, batch_dims=2)[..., 0]
            theta = _root(values_at, lo, hi, g_lo, g_hi, has, tf.abs(at_dt),
                          few_ulps(tf.maximum(tf.abs(at_t), tf.abs(at_t + at_dt))))
            # The first condition to cross wins.
            theta = tf.where(has, theta, tf.constant(float("inf"), t.dtype))
            fired = tf.reduce_any(has, axis=0)
            theta_star = tf.where(fired, tf.reduce_min(theta, axis=0), tf.zeros_like(t_e))
            return theta_star, tf.argmin(theta, axis=0, output_type=tf.int32), fired

        def nothing():
            return tf.zeros_like(t_e), tf.zeros([num], tf.int32), tf.zeros_like(more)

        return tf.cond(tf.reduce_any(crossing), search, nothing)

    def check():
        """The crossings inside the step, one search per slot they fill: `(theta, index,
        new)`, `[K, E]`, the slots filled here and where."""

        def body(theta_0, g_0, more, count, thetas, indexes, new):
            theta_star, index, fired = next_crossing(theta_0, g_0, more)
            slot = (tf.range(slots)[:, None] == count[None]) & fired[None]  # [K, E]
            if slots > 1:  # the next search starts at this crossing, with the conditions there
                g_0 = tf.cond(tf.reduce_any(fired),
                              lambda: tf.where(fired[None], values_at(theta_star), g_0),
                              lambda: g_0)
            count += tf.cast(fired, tf.int32)
            return (tf.where(fired, theta_star, theta_0), g_0, fired & (count < slots), count,
                    tf.where(slot, theta_star[None], thetas),
                    tf.where(slot, index[None], indexes), new | slot)

        none = tf.zeros([slots, num], tf.int32)
        init = (tf.zeros_like(t_e), found.g, live, found.count, tf.zeros([slots, num], t.dtype),
                none, tf.zeros_like(none, tf.bool))
        out = tf.while_loop(lambda theta, g, more, *_: tf.reduce_any(more),
                            _outputs.keeping_shapes(body, init), init, maximum_iterations=slots)
        return out[4:]

    def nothing():
        none = tf.zeros([slots, num], tf.int32)
        return tf.zeros([slots, num], t.dtype), none, tf.zeros_like(none, tf.bool)

    # Nothing to check where no lane that has slots left accepted its trial.
    theta, index, new = tf.cond(tf.reduce_any(live), check, nothing)
    # Constants of the step (else backpropagation would differentiate the search's loops).
    theta = tf.stop_gradient(theta)

    # The states at the event times t*, fixed: a function of the step (naive
    # backpropagation through the loop differentiates it, as ACA's replay does), not of
    # the root. Their value is the one the root finder judged past the crossing (theta*
    # itself, not theta* rounded through t*), so that a solve restarted from one does not
    # find the same crossing again.
    t_star = tf.stop_gradient(t_e[None] + theta * dt_e[None])  # [K, E]
    safe_dt = tf.where(tf.equal(dt_e, 0), tf.ones_like(dt_e), dt_e)
    at = (t_star - t_e[None]) / safe_dt[None]
    at = tf.where(new, theta + (at - tf.stop_gradient(at)), tf.zeros_like(at))
    at_rows = tf.transpose(at) if by_batch else tf.transpose(at[:, :1])  # [R, K]
    values = _outputs.interpolate(y, coeffs, dt_rows, at_rows, by_batch)  # [R, K, ...]
    rates = _rates(coeffs, at_rows)  # [R, K, elements]
    new_rows = new if by_batch else new[:, :1]

    def put(v, old):
        """`v` (`[R, K, ...]`) into the new slots of `old` (`[K, R, ...]`)."""
        v = tf.reshape(tf.transpose(v, [1, 0] + list(range(2, v.shape.rank))), tf.shape(old))
        return tf.where(_outputs.expand(new_rows, old), v, old)

    out = found._replace(
        g=tf.where(accepted[None], g_end, found.g),
        t=tf.where(new, t_star, found.t),
        y=[put(v, old) for v, old in zip(values, found.y)],
        slope=[put(r, old) for r, old in zip(rates, found.slope)],
        index=tf.where(new, index, found.index),
        entry=tf.where(new, entry, found.entry),
        count=found.count + tf.reduce_sum(tf.cast(new, tf.int32), axis=0))
    for x, like in zip(tf.nest.flatten(out), tf.nest.flatten(found)):
        x.set_shape(like.shape)  # as the loop carries it
    return out


def _rates(coeffs, theta_rows):
    """The interpolant's time derivative at `theta_rows` (`[R, K]`), `sum_p (p + 1) theta^p
    c_p`, per component `[R, K, elements]`."""
    return [tf.matmul(_outputs.powers(theta_rows, c.shape[1], derivative=True), c)
            for c in coeffs]


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

    return Detector(condition=condition, directions=tuple(directions), by_batch=by_batch,
                    slots=event.max_events or 1, terminal=event.terminal)


def _as_tuple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


class Outcome(NamedTuple):
    """What a solve returns about its events: per lane (a scalar condition's without a lane
    axis), with a trailing axis of slots (the state's after the lane axis) when the
    event has `max_events`."""

    t: Any
    y: Any  # flat, state layout
    index: Any


def finish(detector, found, ys, ts, t_end, per_sample_times, args, stacked):
    """`(ys, Outcome)`: with a terminal event, the outputs past each lane's last event
    replaced by its state there; the events' times, states and conditions, differentiable
    (see the module docstring). A slot without an event reports where the solve ended:
    `t_end` (`[E]`, its last output time) and its last output, with index -1.

    `ys`: flat outputs, `[n, ...]` (`[n, batch, ...]` with `per_sample_times`, `ts`
    then `[batch, n]`); `found`: the loop's `Found`, its states differentiable;
    `stacked`: keep the slots' axis (the event has `max_events`)."""
    by_batch = detector.by_batch
    bound = detector.bind(args)
    last = [_last_output(y, ts, per_sample_times) for y in ys]
    times, states = [], []
    for k in range(detector.slots):
        t_k, y_k = _implicit(bound, found.t[k], [y[k] for y in found.y],
                             [s[k] for s in found.slope], found.index[k])
        fired = found.index[k] >= 0
        times.append(tf.where(fired, t_k, t_end))
        rows_fired = fired if by_batch else fired[:1]
        states.append([tf.where(_per_lane(rows_fired, y, by_batch), y, end)
                       for y, end in zip(y_k, last)])
    if detector.terminal:
        # The outputs past each lane's last event are its state there.
        t_last = tf.stop_gradient(found.t[-1])
        if per_sample_times:
            sign = tf.sign(tf.reduce_sum(ts[:, -1] - ts[:, 0]))
            past = tf.transpose(sign * (ts - t_last[:, None]) > 0)  # [n, batch]
        else:
            sign = tf.sign(ts[-1] - ts[0])
            past = sign * (ts[:, None] - t_last[None]) > 0  # [n, E]
        past &= (found.index[-1] >= 0)[None]
        out = []
        for y, e in zip(ys, states[-1]):
            mask = past if by_batch else past[:, 0]
            mask = tf.reshape(mask, tf.concat(
                [tf.shape(mask), [1] * (y.shape.rank - mask.shape.rank)], 0))
            out.append(tf.where(mask, e[None], y))
        ys = out
    event_t, index = tf.stack(times), found.index  # [K, E]
    event_y = [tf.stack(parts) for parts in zip(*states)]  # [K, state...]
    if not stacked:
        event_t, index, event_y = event_t[0], index[0], [y[0] for y in event_y]
        if not by_batch:
            event_t, index = event_t[0], index[0]
    elif by_batch:  # the slots after the batch axis
        event_t, index = tf.transpose(event_t), tf.transpose(index)
        event_y = [tf.transpose(y, [1, 0] + list(range(2, y.shape.rank))) for y in event_y]
    else:
        event_t, index = event_t[:, 0], index[:, 0]
    return ys, Outcome(t=event_t, y=event_y, index=index)


def _per_lane(v, x, by_batch):
    """`[E]` (`[1]` when not by batch) laid out to broadcast over the state `x`."""
    return tf.reshape(v, [-1] + [1] * (x.shape.rank - 1)) if by_batch else v[0]


def _implicit(bound, t_found, y_rows, slope_rows, index):
    """One slot's event time and state (`[E]`, per component the state), differentiable:
    the state at the fixed time t* (`y_rows`, from the gradient strategy) moved by the
    implicit function theorem's dt* along the interpolant's slope. Written as one Newton
    step of zero size, so that the gradient of `g(t*, y(t*))` through every input of `g`
    and of `y(t*)`, divided by the rate at which `g` crosses, is dt*'s."""
    by_batch = bound.by_batch
    fired = index >= 0
    t_star = tf.stop_gradient(t_found)
    states = [_outputs.unrows(y, by_batch) for y in y_rows]
    slopes = [tf.stop_gradient(_outputs.unrows(tf.reshape(s, tf.shape(y)), by_batch))
              for s, y in zip(slope_rows, y_rows)]
    t_lane = t_star if by_batch else t_star[0]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([t_lane, *states])
        g = bound.values(t_lane, states)
        each = tf.unstack(g)
    # dg/dt + dg/dy y' per condition and lane: the rate at which each crosses.
    rates = []
    for c in range(len(bound.directions)):
        g_t, g_y = tape.gradient(each[c], [t_lane, states],
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
        along = tf.add_n([tf.reduce_sum(tf.reshape(_outputs.rows(d * s, by_batch),
                                                   [tf.shape(y)[0], -1]), axis=1)
                          for d, s, y in zip(g_y, slopes, y_rows)])
        rates.append(g_t + along if by_batch else tf.reshape(g_t, [1]) + along)
    pick = lambda x: tf.gather(  # noqa: E731
        tf.transpose(x), tf.maximum(index, 0)[:, None], batch_dims=1)[:, 0]
    g_at, rate_at = pick(g), tf.stop_gradient(pick(tf.stack(rates)))
    rate_at = tf.where(fired & tf.not_equal(rate_at, 0), rate_at, tf.ones_like(rate_at))
    t_event = t_star - tf.where(fired, g_at - tf.stop_gradient(g_at), tf.zeros_like(g_at)) / rate_at
    moved = t_event - tf.stop_gradient(t_event)
    moved_rows = moved if by_batch else moved[:1]
    return t_event, [y + _per_lane(moved_rows, y, by_batch) * s for y, s in zip(states, slopes)]


def _last_output(y, ts, per_sample_times):
    """The output at each lane's last time: `y[-1]`, or per sample its last real time."""
    if not per_sample_times:
        return y[-1]
    rows = tf.transpose(y, [1, 0] + list(range(2, y.shape.rank)))
    return tf.gather(rows, _outputs.last_real(ts), batch_dims=1)

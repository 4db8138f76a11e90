"""What the loop records for ACA's replay: the accepted steps' scalars and start states,
as buffers written on every trial (`new`, `write`) and returned as `Checkpoints`."""

from typing import Any, NamedTuple

import tensorflow as tf

from tfaca import _outputs
from tfaca._internals import in_xla_context


class Checkpoints(NamedTuple):
    """Accepted steps of a forward solve, as tensors. Entry `i < num_steps` is one
    iteration of the loop in which some group accepted its trial; entry `num_steps` is
    where the solve ended (`t_final`, its state, `dt` 1), so that every accepted state,
    the last included, has an entry.

    Attributes:
        t: `[num_steps + 1, G]` each group's start time (`[max_steps + 1, G]` under XLA,
            every field). A group that did not step keeps its time, so `t[i + 1]` is
            where step `i` ended.
        dt: `[num_steps + 1, G]` step sizes (1 for a group that is done).
        interval: `[num_steps + 1, G]` int32 index `j` of the interval
            `[stops[j - 1], stops[j]]` the step lies in.
        hit: `[num_steps + 1, G]` bool, whether the step ends exactly on `stops[j]`.
        accepted: `[num_steps + 1, G]` bool, which groups the entry's step moved.
        y: flat list of `[num_steps + 1, ...]` start states.
        num_steps: int32 scalar.
        stride: with a checkpoint budget (`integrate(states=K)`), an int32 scalar: `y[m]`
            is entry `m * stride`'s start, `ceil(num_steps / stride) <= K` entries (under
            XLA all `K + 1` slots, the last unused).
        y_end, f_end: with `states` given, the state and the carried derivative where
            the solve ended (`states=0`, MALI's, keeps no other state).
        f_jump: with `states=0` and jumps, the carried derivative (ALF's `v`) as each
            step that landed on a jump left it, before `func` was evaluated afresh
            there: flat list of `[J, ...]` (`[J, batch, ...]` per sample; `J` the most
            jumps of a group), by the jump's rank (`jump_rank`), which MALI's inverse
            steps need to go on past the jump.
    """

    t: Any
    dt: Any
    interval: Any
    hit: Any
    accepted: Any
    y: Any
    num_steps: Any
    stride: Any = ()
    y_end: Any = ()
    f_end: Any = ()
    f_jump: Any = ()


def _keep_thinned(slots, stride, n, y, budget):
    """ACA's checkpoint budget: keeps the start `y` of step `n` in `slots` when `n` is a
    multiple of `stride`, at slot `n // stride`; when that is past the `budget` slots,
    first drops every other slot (slot `j` takes slot `2 j`) and doubles the stride.

    Runs on every trial, like every write of the loop; a rejected trial's write is
    redone by the retry, and a trial that keeps nothing writes to the last slot, which
    is never read. Returns `(slots, stride)`."""

    def move(j, tas):
        return j + 1, [ta.write(j, ta.read(2 * j)) for ta in tas]

    # A loop of no iteration unless the slots are full, not a `tf.cond`: XLA copies the
    # buffers a conditional takes and returns, on every trial (K = 256 slots doubled a
    # 12-step solve's time), where a loop updates them in place.
    full = (n % stride == 0) & (n // stride >= budget)
    _, slots = tf.while_loop(lambda j, _: full & (j < (budget + 1) // 2), move,
                             (tf.constant(1, tf.int32), list(slots)))
    stride = tf.where(full, 2 * stride, stride)
    slot = tf.where(n % stride == 0, n // stride, budget)
    return [ta.write(slot, y_n) for ta, y_n in zip(slots, y)], stride


def _dense(ta, size, like):
    """The first `size` entries of a TensorArray as one tensor.

    Checkpoints leave the loop as plain tensors, not TensorArrays: a SavedModel can
    serialize a custom gradient that captures tensors but not TensorArray handles
    (variants). Outside XLA the buffer holds the trials' entries (one more than the
    accepted steps after a failed solve): gather the accepted ones. XLA needs static
    shapes and returns the whole buffer, without a copy: `max_steps + 1` entries, or
    the budget's `K + 1` slots, the last of which took the writes that kept nothing
    (gathering the first `K` copied them all, 2 MB for 256 states of 64 x 32, on
    every call). `like` is a tensor shaped as one entry.
    """
    if in_xla_context():
        return ta.stack()
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


# Under XLA every buffer has a static size: keeping every accepted state would allocate
# and zero-fill `max_steps` states on every call however few steps the solve takes (a
# `max_steps` of 4,096 doubled a small solve's forward+backward). Where XLA compiles the
# loop and `max_steps` exceeds this, ACA keeps at most this many states (the checkpoint
# budget's thinning): every state while the solve takes fewer steps, else every
# `stride`-th, the replay rebuilding the others (`rebuilt_steps`).
XLA_STATES = 256


def rebuilt_steps(num_steps, budget):
    """How many forward steps a budgeted replay rebuilds: `num_steps` entries kept with
    stride `s`, the smallest power of 2 with `(num_steps - 1) // s < budget` (the
    thinning of `_keep_thinned`), make `ceil(num_steps / s)` segments, each rebuilt from
    its first state up to its last entry's start. `num_steps`: int32 tensor."""
    q = tf.maximum(num_steps - 1, 0) // budget
    exponent = tf.math.ceil(tf.math.log(tf.cast(q + 1, tf.float64)) / tf.math.log(
        tf.constant(2.0, tf.float64)))
    stride = tf.bitwise.left_shift(tf.ones_like(num_steps), tf.cast(exponent, num_steps.dtype))
    return num_steps - (num_steps + stride - 1) // stride


def new(dtype, max_steps, t0, y0, states):
    """The empty checkpoint buffers of a solve from `t0`, `y0` (see `write`)."""
    recorded = {}
    # A step's scalars, (t, dt, stop, hit, accepted), are packed into one entry of the
    # time's dtype: one write per trial instead of five. The stop index is exact in
    # it (float32 holds integers to 2**24; the loop takes at most `max_steps` trials).
    recorded["scalars"] = _scalar_log(dtype, max_steps, 5, t0)
    if states is None:
        recorded["y"] = [_step_array(y.dtype, max_steps, y.shape) for y in y0]
    elif states > 0:
        # K slots and a last one that takes the trials' writes that keep nothing. Written
        # once before the loop: XLA cannot read (`_keep_thinned`) a TensorArray of an
        # unknown static shape (a batch of unknown size) that entered the loop unwritten.
        recorded["y"] = [_tensor_array(y.dtype, states + 1, y.shape).write(states, y)
                         for y in y0]
        recorded["stride"] = tf.constant(1, tf.int32)
    return recorded


def write(s, dt, hit, accept, active, states, dtype):
    """The checkpoint buffers after this trial, written at the index of the next accepted
    step (a rejected trial's entry is overwritten by the retry)."""
    if not s.record:
        return s.record
    new = dict(s.record)
    # A step of size 0 (a group that is done) is recorded as 1: the replay divides by it.
    scalars = [s.t, tf.where(active, dt, tf.ones_like(dt)), tf.cast(s.i_out, dtype),
               tf.cast(hit, dtype), tf.cast(accept, dtype)]
    new["scalars"] = _log_write(s.record["scalars"], s.entries, tf.stack(scalars))
    if states is None:
        new["y"] = [ta.write(s.entries, y) for ta, y in zip(s.record["y"], s.y)]
    elif states > 0:
        new["y"], new["stride"] = _keep_thinned(s.record["y"], s.record["stride"], s.entries,
                                                s.y, states)
    return new


def checkpoints(state, y0, states, dtype):
    """The recorded steps as `Checkpoints`, with the end of the solve as entry `num_steps`."""
    rec, n = state.record, state.entries
    ones = tf.ones_like(state.t)
    last = [state.t, ones, tf.cast(state.i_out, dtype), 0 * ones, 0 * ones]
    scalars = _log_read(_log_write(rec["scalars"], n, tf.stack(last), once=True), n + 1)
    if states is None:
        y = [_dense(ta.write(n, y_n), n + 1, like) for ta, y_n, like in zip(rec["y"], state.y, y0)]
    elif states > 0:
        y = [_dense(ta, (n + rec["stride"] - 1) // rec["stride"], like)
             for ta, like in zip(rec["y"], y0)]
    else:
        y = ()
    # Each column a copy of its own: the log is freed once they are taken.
    return Checkpoints(
        t=scalars[:, 0], dt=scalars[:, 1], interval=tf.cast(scalars[:, 2], tf.int32),
        hit=scalars[:, 3] > 0, accepted=scalars[:, 4] > 0, y=y, num_steps=n,
        stride=rec["stride"] if states else (),
        y_end=list(state.y) if states is not None else (),
        f_end=list(state.f) if states is not None else (),
        f_jump=rec.get("f_jump", ()),
    )


def jump_rank(jumps, stop):
    """`[G]`: which of its group's jumps (`jumps`: `[G, S]` bool, the stops where `func`
    jumps) stop `stop` (`[G]`) is, counting from 0; -1 before the first."""
    return _outputs.at_stop(tf.cumsum(tf.cast(jumps, tf.int32), axis=1) - 1, stop)


def new_jumps(f0, jumps):
    """The empty `f_jump` buffers (`Checkpoints`): one entry shaped like `f0` per jump of
    the group with the most (at least one); under XLA, whose shapes are static, one per
    stop."""
    if in_xla_context():
        size = tf.shape(jumps)[1]
    else:
        size = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(jumps, tf.int32), axis=1)), 1)
    return [tf.zeros(tf.concat([[size], tf.shape(f)], 0), f.dtype) for f in f0]


def at_jumps(buffers, jumps, stop, keep, f, shared):
    """`f_jump` after a trial: `f` (each group's carried derivative) written at the rank
    of the jump at stop `stop` (`[G]`) where `keep` (`[G]`: the step landed on it)."""
    index = _jump_index(jumps, stop, shared)
    out = []
    for buf, old, x in zip(buffers, before_jump(buffers, jumps, stop, shared), f):
        if shared:
            new = tf.where(keep[0], x, old)[None]
        else:
            new = tf.where(tf.reshape(keep, [-1] + [1] * (x.shape.rank - 1)), x, old)
        out.append(tf.tensor_scatter_nd_update(buf, index, new))
    return out


def _jump_index(jumps, stop, shared):
    """Where `f_jump` holds each group's entry for the jump at stop `stop` (`[G]`): the
    `gather_nd` indices, `[[rank]]` when shared, else `[[rank_g, g]]`."""
    rank = tf.maximum(jump_rank(jumps, stop), 0)
    if shared:
        return rank[:1, None]
    return tf.stack([rank, tf.range(tf.shape(rank)[0])], 1)


def before_jump(buffers, jumps, stop, shared):
    """The carried derivative each group's step left at the jump at stop `stop` (`[G]`),
    from `f_jump`."""
    index = _jump_index(jumps, stop, shared)
    if shared:
        return [tf.gather_nd(buf, index)[0] for buf in buffers]
    return [tf.gather_nd(buf, index) for buf in buffers]

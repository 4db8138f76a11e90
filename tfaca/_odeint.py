"""`odeint` and `solve`: argument checks, dtypes, structures, dispatch. No loop code here."""

import collections.abc
import functools
import logging

import numpy as np
import tensorflow as tf

from tfaca import _events, _jit, _outputs
from tfaca import _paths as _signals
from tfaca._control import StepSizeController
from tfaca._internals import in_xla_context
from tfaca._loop import graph_assert, raise_on_failure
from tfaca._options import SolverOptions, options_refusal
from tfaca._solution import Solution

_LOW_PRECISION = (tf.float16, tf.bfloat16)


def _tolerance(name, value, y0_structure, y0_flat, dtype):
    """A scalar, or a structure like `y0` of values broadcastable to each component."""
    if tf.nest.is_nested(value) and tf.nest.is_nested(y0_structure):
        if _paths(value) != _paths(y0_structure):
            raise ValueError(
                f"`{name}` must be a scalar or have the structure of `y0`. Received: {name}={value!r}"
            )
        flat = tf.nest.flatten(value)
    else:
        flat = [value] * len(y0_flat)
    out = []
    for v, y in zip(flat, y0_flat):
        v = _as_tensor(v, dtype)
        if not v.shape.is_compatible_with(y.shape) and v.shape.rank:
            try:
                tf.broadcast_static_shape(v.shape, y.shape)
            except ValueError as e:
                raise ValueError(
                    f"`{name}` must broadcast to the state's shape {y.shape}. "
                    f"Received: shape {v.shape}"
                ) from e
        out.append(v)
    return out


def _as_tensor(value, dtype):
    """A tensor of `dtype`; Python and NumPy values convert exactly, never via float32."""
    if tf.is_tensor(value):
        return tf.cast(value, dtype)
    return tf.convert_to_tensor(np.asarray(value, dtype=dtype.as_numpy_dtype))


def _as_arg(value, dtype):
    """An entry of `args` as a tensor: Python numbers and NumPy arrays take the solve's
    dtype when floating (never float32 by default), low-precision tensors are solved in
    float32 like the state, other tensors are left as they are."""
    if tf.is_tensor(value) or isinstance(value, tf.Variable):
        value = tf.convert_to_tensor(value)  # a variable is read here, once
        return tf.cast(value, tf.float32) if value.dtype in _LOW_PRECISION else value
    array = np.asarray(value)
    if array.dtype.kind == "f" or isinstance(value, float):
        return _as_tensor(array, dtype)
    return tf.convert_to_tensor(value)


def _holds_tensors(value):
    """Whether a (nested) list or tuple holds tensors or variables."""
    return isinstance(value, (list, tuple)) and any(
        tf.is_tensor(x) or isinstance(x, tf.Variable) or _holds_tensors(x) for x in value)


def _prepare_ts(ts, dtype):
    if _holds_tensors(ts):
        # `[0.0, T]` with `T` a variable or tensor: stacked as tensors, so that the
        # gradient reaches `T` (NumPy would read its value and cut it off).
        ts = tf.nest.map_structure(lambda x: _as_tensor(x, dtype), ts)
        ts = tf.stack([tf.stack(row) if isinstance(row, list) else row for row in ts])
    ts = tf.convert_to_tensor(ts) if tf.is_tensor(ts) else np.asarray(ts)
    kind = tf.as_dtype(ts.dtype) if ts.dtype != object else None
    if kind is None or not (kind.is_floating or kind.is_integer):
        raise TypeError(f"`ts` must be real numbers. Received: ts={ts!r}")
    ts = _as_tensor(ts, dtype)
    if ts.shape.rank == 2:
        return _prepare_per_sample_ts(ts)
    if ts.shape.rank != 1:
        raise ValueError(
            f"`ts` must be 1-D, or 2-D (batch, n) for times per sample. Received: ts with "
            f"shape {ts.shape}"
        )
    if ts.shape[0] is not None and ts.shape[0] < 2:
        raise ValueError(
            f"`ts` must hold at least two times (the start and an output). Received: ts={ts!r}"
        )
    if hasattr(ts, "numpy"):
        diffs = np.diff(ts.numpy())
        if not (np.all(diffs > 0) or np.all(diffs < 0)):
            raise ValueError(
                f"`ts` must be strictly increasing or strictly decreasing. Received: ts={ts.numpy()}"
            )
    else:
        diffs = ts[1:] - ts[:-1]
        monotone = tf.reduce_all(diffs > 0) | tf.reduce_all(diffs < 0)
        ts = _checked(ts, monotone, "`ts` must be strictly increasing or strictly decreasing.")
    return ts


_PER_SAMPLE_RULE = (
    "`ts` of shape (batch, n) must hold, in every row, the common start ts[:, 0] followed by "
    "that sample's times, strictly increasing (or all rows strictly decreasing), and may end "
    "in repeats of the row's last time (padding for fewer observations; a row of repeats "
    "only is a sample that does not move)."
)
_PER_SAMPLE_FIX = (
    "To fix it: start every row at the same time (prepend the common start to each "
    "sample's observation times), keep each row monotone in one direction, and pad a "
    "shorter row by repeating its last time at the end."
)


def _checked(ts, valid, message, data=()):
    """`ts` after a graph assertion that `valid`; under XLA, which has no assertions, NaN
    times when not valid: the solve then reports NONFINITE with NaN outputs, never
    outputs at times it did not solve for. `data`: more tensors for the message."""
    if in_xla_context():
        return tf.where(valid, ts, tf.constant(float("nan"), ts.dtype))
    check = graph_assert(valid, [message, *data, "Received: ts=", ts], summarize=20)
    with tf.control_dependencies([check]):
        return tf.identity(ts)


def _rows_valid(ts):
    """`[batch]` bool: which rows of 2-D `ts` follow `_PER_SAMPLE_RULE`."""
    t0 = _outputs.common_start(ts)
    last = ts[:, -1]
    # The direction of the row farthest from the start (0 if none leaves it).
    far = tf.concat([last - t0, [0.0 * t0]], 0)
    direction = tf.sign(tf.gather(far, tf.argmax(tf.abs(far))))
    diffs = ts[:, 1:] - ts[:, :-1]
    strict = direction * diffs > 0
    steps = tf.cast(strict, tf.int32)
    return (
        tf.equal(ts[:, 0], t0)
        & tf.reduce_all(strict | tf.equal(diffs, 0), axis=1)
        # Once a row repeats a time, it only repeats: padding ends a row.
        & tf.reduce_all(steps[:, 1:] <= steps[:, :-1], axis=1)
    )


def _prepare_per_sample_ts(ts):
    if ts.shape[1] is not None and ts.shape[1] < 2:
        raise ValueError(
            "`ts` of shape (batch, n) must hold at least two times per row (the start and an "
            f"output). Received: ts with shape {ts.shape}"
        )
    valid = _rows_valid(ts)
    # The first row that breaks the rule (0 when none does, or the batch is empty).
    row = tf.argmax(tf.concat([tf.cast(~valid, tf.int32), [1]], 0), output_type=tf.int32)
    if hasattr(ts, "numpy"):
        if not bool(tf.reduce_all(valid)):
            row = int(row)
            raise ValueError(
                f"{_PER_SAMPLE_RULE} Row {row} breaks it: ts[{row}]={ts.numpy()[row]}, with "
                f"common start ts[0, 0]={ts.numpy()[0, 0]}. {_PER_SAMPLE_FIX} Received: "
                f"ts={ts.numpy()}")
        return ts
    return _checked(ts, tf.reduce_all(valid), _PER_SAMPLE_RULE + " " + _PER_SAMPLE_FIX,
                    ["Row", row, "breaks it: ts[row] =", ts[row:row + 1]])


def _same_batch(ts, y0_flat):
    """`ts` (2-D) after a graph assertion that its batch is every state component's, when
    a batch size is unknown while tracing (a Keras batch): the solve's own message
    rather than TensorFlow's, from deep inside the loop. Under XLA shapes are static
    when it compiles."""
    sizes = [ts.shape[0]] + [y.shape[0] for y in y0_flat]
    if hasattr(ts, "numpy") or in_xla_context() or None not in sizes:
        return ts
    batch = tf.shape(ts)[0]
    same = tf.reduce_all(tf.stack([tf.equal(tf.shape(y)[0], batch) for y in y0_flat]))
    check = graph_assert(same, [
        "`ts` of shape (batch, n) needs every component of `y0` to have the same batch "
        "as its leading axis. Received: ts with shape", tf.shape(ts),
        "and state components of shapes", *[tf.shape(y) for y in y0_flat]])
    with tf.control_dependencies([check]):
        return tf.identity(ts)


def _padded(ts):
    """`[batch, n]` bool: entries that repeat their row's previous time (padding)."""
    repeats = tf.equal(ts[:, 1:], ts[:, :-1])
    return tf.concat([tf.zeros_like(repeats[:, :1]), repeats], axis=1)


def _paths(structure, prefix=()):
    """Leaf paths of a nest: dict keys and sequence positions, in `tf.nest` order."""
    if isinstance(structure, collections.abc.Mapping):
        items = sorted(structure.items())
    elif tf.nest.is_nested(structure):
        items = enumerate(structure)
    else:
        return [prefix]
    return [p for key, value in items for p in _paths(value, prefix + (key,))]


def _structure(tree):
    """A hashable description of a nested structure (its containers and their keys)."""
    return repr(tf.nest.map_structure(lambda _: None, tree))


def _hashable(options):
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


def _flat_func(func, y0, args, num_args, dtype):
    """Wraps `func(t, y, *args)` as `f(t, y_flat, args_flat) -> flat list`, checking its output.
    `f.precisions` collects, as `func` is traced, the dtypes it returned in (float16 from
    a mixed-precision Keras model, cast to the solve's `dtype` here): how closely a replay
    of a step can reproduce it (`_base.reproduction_tolerance`)."""

    def f(t, y_flat, args_flat):
        y = tf.nest.pack_sequence_as(y0, y_flat)
        user_args = tf.nest.pack_sequence_as(args, args_flat) if num_args else args
        out = func(t, y, *user_args)
        # Same paths (dict keys, sequence positions); a list may stand for a tuple.
        if _paths(out) != _paths(y0):
            raise ValueError(
                "`func` must return dy/dt with the structure of `y0`. "
                f"Received: {tf.nest.map_structure(lambda x: getattr(x, 'shape', x), out)!r} "
                f"for a state {tf.nest.map_structure(lambda x: x.shape, y0)!r}"
            )
        out_flat = []
        for o, y_n in zip(tf.nest.flatten(out), y_flat):
            o = tf.convert_to_tensor(o)
            if not o.shape.is_compatible_with(y_n.shape):
                raise ValueError(
                    f"`func` must return dy/dt with the shape of the state. Received: shape "
                    f"{o.shape} for a state of shape {y_n.shape}"
                )
            if not o.dtype.is_floating:
                raise TypeError(f"`func` must return floating values. Received dtype {o.dtype.name}")
            f.precisions.add(o.dtype)
            out_flat.append(tf.cast(o, dtype) if o.dtype != dtype else o)
        return out_flat

    f.precisions = set()
    return f


def _user_code_converted(entry):
    """`entry(func, ...)`, a public solve, run without AutoGraph, `func` alone converted
    as the caller's code is (`tf.function`'s default, Keras' `fit`): AutoGraph would
    otherwise rewrite the whole solver (its loops, controller, outputs and gradients),
    which has no Python control flow on tensors to convert, at every trace; measured on
    a neural-CDE training step, 7.8 s of tracing against 2.5 s (`benchmarks/cde_step.py`)."""
    unconverted = tf.autograph.experimental.do_not_convert(entry)

    @functools.wraps(entry)
    def converted_func_only(func, *args, **kwargs):
        context = tf.__internal__.autograph.control_status_ctx()
        # Only where AutoGraph is on: elsewhere (eagerly) `func` stays the object it is,
        # which eager calls with `jit_compile=True` reuse their compiled functions by.
        if callable(func) and context.status.name == "ENABLED":
            func = tf.__internal__.autograph.tf_convert(func, context)
        return unconverted(func, *args, **kwargs)

    return converted_func_only


@_user_code_converted
def solve(
    func,
    y0,
    ts,
    *,
    args=(),
    control=None,
    event=None,
    method="dopri5",
    rtol=1e-3,
    atol=1e-6,
    gradient="aca",
    step_size=None,
    first_step=None,
    max_step=None,
    min_step=None,
    force_min_step=False,
    step_ts=None,
    jump_ts=None,
    max_steps=1000,
    safety=0.9,
    factor_min=0.2,
    factor_max=10.0,
    controller=None,
    interpolate=True,
    per_sample=False,
    throw=True,
    jit_compile="auto",
    precision="float32",
    name=None,
    options=None,
):
    """Solves `dy/dt = func(t, y, *args)` from `y(ts[0]) = y0` and returns a `Solution`.

    Args:
        func: `func(t, y, *args)` returning dy/dt with the structure, shapes and dtype of
            `y`. Variables it reads (`tf.Variable`s, Keras weights) get gradients.
        y0: the initial state: a float tensor of any shape, or a nested structure (tuple,
            list, dict) of float tensors of one dtype. float16/bfloat16 states are solved
            in float32 and returned in their own dtype.
        ts: the output times; `ts[0]` is the start. Either 1-D: at least two strictly
            increasing or strictly decreasing times. Or 2-D, `(batch, n)`: times per
            sample, the leading axis of every state component being the batch; every
            row starts with the same time (`y0`'s), then that sample's own times,
            strictly monotone in the same direction, and may end in repeats of its last
            time (padding for samples with fewer observations: a padded entry returns
            the state at the last real time, costs no step and gets no gradient, nor
            passes one on; a row of repeats only is a sample that does not move, and a
            batch of such rows returns `y0` without a step). One solve runs to the time
            farthest from the start, and each sample is interpolated at its own times
            (it requires `interpolate=True`, or per-sample steps). A list may hold
            tensors or variables (`[0.0, T]`): they receive their gradient.
        args: a tuple of extra inputs passed to `func`; floating ones receive
            gradients. Python numbers and NumPy arrays convert to the solve's dtype;
            float16/bfloat16 tensors are cast to float32 (solves never run in low
            precision); other tensors keep their dtype.
            Tensors that `func` closes over get gradients too when a tape watches them.
        control: an input signal, a path through observations (`tfaca.LinearPath`,
            `RectilinearPath`, `HermitePath`, `CubicPath`): `func` is then called as
            `func(t, y, u, *args)` with `u = control.evaluate(t)`, `[batch, channels]`
            (per sample at its own `t` with `per_sample=True`). Gradients reach the
            path's values and times as they reach `args`, in every gradient mode. Where
            the path's derivative jumps (linear, rectilinear) the solver steps onto
            every knot inside the solve: a step ends just before the knot and the next
            starts just after it, so no step straddles a jump (as `jump_ts`). The
            smooth paths' (Hermite, cubic) knots are left to the error control. See
            also `tfaca.cdeint`.
        event: a `tfaca.Event`: the solve ends where its condition `condition(t, y,
            *args)` crosses zero (per sample when it returns one value per sample:
            each sample stops at its own with `per_sample=True`; shared steps run until
            every sample has had its own). The crossing is found on the accepted steps'
            interpolants (checked at three interior points of each step too) to a few
            ulps of time. Outputs asked for past a sample's event are its state there.
            `Solution.event_t`, `event_y`, `event_index` report it, differentiable
            (implicit function theorem at the crossing, with ACA's replay or naive
            backpropagation; the adjoint and MALI refuse events), and `status` is
            `Status.EVENT`. See docs/solving.md#events.
        method: a solver name (`"euler"`, `"midpoint"`, `"rk4"`, `"heun_euler"`, `"bosh3"`,
            `"dopri5"`, `"tsit5"`, `"alf"`), class or instance. Default `"dopri5"`.
            `"alf"` (`tfaca.ALF`, the asynchronous leapfrog) is the invertible solver
            of `gradient="mali"`. `"kvaerno3"`, `"kvaerno5"` (`tfaca.Kvaerno5`, options
            `jacobian`, `jac`, `kappa`, `max_iterations`): implicit (ESDIRK) solvers
            for stiff problems, each stage solved by Newton's method with the Jacobian
            of `func`; not with `gradient="adjoint"` (docs/solving.md, "Stiff
            problems").
        rtol, atol: relative and absolute tolerances: scalars, or structures like `y0`
            of values broadcastable to each component. Defaults 1e-3 and 1e-6, as
            scipy's `solve_ivp` and the ACA reference code (TorchDiffEqPack); loose
            enough for training, where the gradient's accuracy matters more than the
            trajectory's (torchdiffeq's defaults are 1e-7 and 1e-9).
        gradient: `"aca"` (default; exact gradient of the accepted steps, memory
            O(steps x state)), `"naive"` (backprop through the whole solver, rejected
            trials included; memory O(trials x stages x state)) or `"adjoint"` (the
            continuous adjoint: memory O(state), gradient only as accurate as its
            reverse solve), `"mali"` (with `method="alf"` only: exact gradient of the
            ALF steps, memory O(state) whatever the number of steps), or a strategy
            object (`tfaca.AdjointGradient(rtol=...)`; `tfaca.ACAGradient(checkpoints=K)`
            keeps at most `K` states and rebuilds the others, same gradient as
            `"aca"`). Every strategy works with interpolated or stepped-onto outputs,
            shared or per-sample times and steps.
        step_size: a fixed step size. Required by the fixed-step methods; with an
            adaptive method it switches the error control off.
        first_step: the first trial step; default: chosen automatically
            (Hairer–Nørsett–Wanner), at the cost of one evaluation of `func`.
        max_step: an upper bound on the step size; default unbounded.
        min_step: a lower bound on the step size (default None: steps shrink until they
            no longer advance time, `Status.DT_UNDERFLOW`). A trial of `min_step` (or a
            shorter one landing on a stop) that the error control rejects ends the
            solve with `Status.DT_UNDERFLOW` and the time it reached, unless
            `force_min_step`.
        force_min_step: True: such a trial is accepted instead, unless it is not
            finite, and counted in `Solution.stats.num_forced` (the solution is less
            accurate than `rtol`/`atol` there; diffrax's `force_dtmin`). Default False.
        step_ts: times the solver steps onto exactly, besides the output times (diffrax's
            `step_ts`): `(m,)`, or `(batch, m)` per sample (each sample's own with
            `per_sample=True`; with shared steps, every sample's). Times on or outside
            the solve's span are ignored. Outputs stay interpolated (or stepped onto
            with `interpolate=False`). They move no gradient: the steps' ends are
            constants of the solve.
        jump_ts: times where `func` jumps (a switched input, a dose, a reset):
            `(m,)` or `(batch, m)` as `step_ts`. A step ends one ulp before each jump
            and the next starts one ulp after it, with `func` evaluated afresh there
            (the first-same-as-last stage is not carried across; diffrax's `jump_ts`,
            torchdiffeq's `jump_t`): no step, nor its interpolant, straddles the jump,
            so the error control meets no discontinuity (no cascade of rejected
            trials) and a left-continuous `func` is evaluated on each step's own
            side. Every gradient mode steps through them (MALI keeps ALF's `v` as
            each jump's step left it, one state per jump, to invert the steps before).
        max_steps: the largest number of trial steps (accepted or rejected), a Python
            int, with `interpolate=False` at least `len(ts) - 1`; a solve that needs more fails with
            `Status.MAX_STEPS_REACHED`. Default 1000. Outside XLA it costs nothing up
            front: time and memory follow the steps taken. Under XLA buffers need
            static shapes, so a call that computes an ACA gradient allocates and
            zero-fills `max_steps x (state size + 13 bytes)` every time, however few
            steps it takes (`benchmarks/max_steps_xla.py`: a 64x64 float32 state in 3
            steps took 2.4 ms forward+backward at 1,000, 134 ms and 1.6 GB at 100,000;
            a plain `tf.function` 2.2-3.0 ms at each); a forward pass with no gradient
            pending does not pay it. `gradient="naive"` under XLA sizes a buffer per
            intermediate of a step by `max_steps`. Under XLA, keep `max_steps` a small
            multiple of the trials your problem takes (`Solution.stats`).
        safety, factor_min, factor_max: step-size controller parameters; defaults 0.9,
            0.2 and 10 as scipy and torchdiffeq.
        controller: None (default): the integral step-size controller, as scipy,
            torchdiffeq and TorchDiffEqPack; or a `tfaca.PIDController(pcoeff, icoeff,
            dcoeff)`, whose update also reads the last two accepted steps' errors:
            fewer rejected trials where the error estimate oscillates (mildly stiff
            problems). `PIDController(0, 1, 0)` takes the integral controller's steps.
        interpolate: if True (default), the steps are chosen by the error control alone
            and each output between the start and the last time is read from the
            continuous extension of the accepted step it lies in (Dopri5's and Tsit5's
            own, fourth order; cubic Hermite, third order, for the other solvers), as
            every peer library does: output times cost no steps and no evaluations of
            `func`, and the gradient (ACA, naive or adjoint) is exact for the
            interpolated outputs, their times included. Interpolation is accurate to
            the order of the interpolant, at about the solver's tolerance. If False,
            the solver steps exactly onto every output time: each output is a step's
            end (as accurate as the steps themselves), at the price of at least
            `len(ts) - 1` steps. With two times (start and end) both are the same solve.
        per_sample: if True, the leading axis of every component of `y0` is a batch of
            independent samples, and each is solved as if alone: its own time, step
            size, error estimate (`rtol`/`atol` keep their meaning per sample: the RMS
            is over that sample's elements), accepted and rejected trials, and output
            landing or interpolation. The loop runs until the last sample is done,
            and done samples are frozen; a sample's outputs and gradients do not
            depend on the others in its batch (`func` must not mix samples, e.g.
            BatchNorm in training). `func` then receives `t` of shape `(batch,)`,
            each sample's own time; `Solution.stats` fields, `status` and `t_final`
            are `(batch,)` too. With times per sample, each sample stops at its own
            last time, and `interpolate=False` steps onto each sample's own times.
            Gradients: `"aca"` (per-sample checkpoints, replayed with the other
            samples' cotangents masked: exact for each sample's own steps; its second
            derivatives are not available per sample and raise), a checkpoint budget
            and `"mali"` (the same replay, masked likewise), `"naive"`, and
            `"adjoint"` (a reverse solve per sample; the parameters' adjoint is a
            quadrature over its accepted steps, outside its error control). Cost:
            every sample is evaluated in every iteration (done samples with a step of
            size 0), so a batch costs the trials of its slowest sample. Default
            False: one step size for the batch, from the RMS error over every
            element, as torchdiffeq and TFP do.
        throw: if True (default) a failed solve raises: `tfaca.SolveError` eagerly,
            `tf.errors.InvalidArgumentError` in a graph. Under XLA
            (`jit_compile=True`) run-time assertions do not exist, so a failure is
            reported only by `Solution.status`, and unreached outputs are NaN. With
            `throw=False` nothing raises, in the forward or the backward pass: a
            gradient that cannot be computed (the adjoint's reverse solve failed, ACA's
            replay did not reproduce the forward) is NaN.
        jit_compile: whether the solver's loops (the forward integration, ACA's replay,
            the adjoint's reverse solve) run as functions compiled with XLA when the
            graph around them is not compiled (Keras' default `fit` on a CPU or under
            `tf.distribute`, a plain `tf.function`). `"auto"` (default): in a graph,
            for the ACA and adjoint gradients, when `func` uses only operations XLA
            compiles and, unless a GPU is visible, no convolution (whose gradient XLA
            runs slowly inside a loop on CPU); never eagerly. True: always (also
            eagerly, where later calls of the same `func` object reuse the compiled
            functions; a new function object compiles anew, and TensorFlow keeps every
            compiled program, 5-20 MB each); False: never. Results and
            gradients are the same to rounding; failures raise as without it. Under
            `jit_compile=True` of the surrounding function it changes nothing.
        precision: `"float32"` (default): a solve in float32 (also of a float16 or
            bfloat16 state, which computes in float32) turns TensorFlow's TensorFloat-32
            off, for the process: on Ampere and newer NVIDIA GPUs TensorFlow otherwise
            runs float32 matrix products and convolutions with 10-bit mantissas
            (about 1e-3 relative), which an `rtol` below that cannot mean. TensorFlow
            has no switch per operation, so the setting holds for every computation of
            the process from then on (`tf.config.experimental.
            enable_tensor_float_32_execution`); tfaca logs it once. `"tf32"`: leave
            TensorFlow's setting as it is (faster matrix products on such GPUs, errors
            near 1e-3 whatever `rtol`). Nothing changes on CPUs or for float64.
        name: name scope for the ops.
        options: not accepted: torchdiffeq's `options=dict(step_size=...)` is refused
            with a TypeError that spells the same call with keyword arguments
            (`step_size=...`), which are tfaca's only way to pass options.

    Returns:
        A `Solution` with `ts`, `ys` (structure of `y0`, leading axis `len(ts)`; with
        times per sample `(batch, n)`, `ys[k, b]` is sample `b` at `ts[b, k]`), `stats`,
        `status` and `t_final` (and with an `event`, `event_t`, `event_y`,
        `event_index`).

    Raises:
        ValueError, TypeError: on bad arguments, naming the argument.
        SolveError: eagerly, when the solve fails and `throw=True`.

    Control flow and limitations:
        a solve may sit in a `tf.while_loop` body (`tf.scan`, a Keras RNN cell) or a
        `tf.cond` branch, and `func` may read variables there: the gradient is the one
        it has outside. Inside the gradient of a `tf.cond` branch the backward loops
        run uncompiled (TensorFlow cannot take a branch's tensors into a compiled
        function there; `jit_compile` is ignored). With `gradient="naive"` inside a
        function compiled whole (`tf.function(jit_compile=True)`), TensorFlow 2.21
        cannot compile a solve that reads variables in a `tf.cond` branch ("Resource
        _Retval node's input does not come from _Arg directly"): solve outside the
        cond and select, `tf.where(pred, ys, other)`, or use `"aca"`.
    """
    if options is not None:
        raise TypeError(options_refusal(options))
    if not callable(func):
        raise TypeError(f"`func` must be callable. Received: func={func!r}")
    if not isinstance(args, tuple):
        raise TypeError(f"`args` must be a tuple. Received: args={args!r}")
    # Every option is checked by its one declaration; from here on it is read from `opts`.
    opts = SolverOptions.from_arguments(locals())
    per_sample = opts.per_sample
    knots = None
    user_args = args
    if control is not None:
        func, args, knots = _controlled(func, control, args)
    with tf.name_scope(name or "odeint"):
        y0_flat, y_dtype, dtype = _prepare_y0(y0)
        _apply_precision(opts.precision, dtype)
        y0_struct = tf.nest.pack_sequence_as(y0, y0_flat)
        ts = _prepare_ts(ts, dtype)
        times_per_sample = ts.shape.rank == 2
        if per_sample:
            _check_leading_batch(y0_flat)
        if times_per_sample:
            ts, padded, ts_solved = _per_sample_times(ts, y0_flat, opts)
        else:
            ts_solved = ts
        plan = _outputs.plan(ts_solved, opts.interpolate, per_sample)
        # Times to step onto besides the outputs, and which of them are jumps: the
        # user's `step_ts` and `jump_ts`, and the knots of a path whose derivative jumps
        # there (linear, rectilinear). The smooth paths' knots (Hermite's second
        # derivative, a spline's third jump there) are left to the error control, as
        # torchcde and diffrax do: stopping at each cost a neural CDE 3.7x the peers'
        # steps on smooth data (benchmarks/cde_step.md). A jump at a time that is also
        # a plain stop is a jump (merged after it, it comes first).
        forced = [(_forced_times("step_ts", opts.step_ts, dtype, y0_flat), False),
                  (None if knots is None or not knots[1] else knots[0], True),
                  (_forced_times("jump_ts", opts.jump_ts, dtype, y0_flat), True)]
        jumps = None
        for times_, jump in forced:
            if times_ is not None:
                plan, jumps = _outputs.with_stops(plan, times_, per_sample, jump, jumps)
        if not any(jump and times_ is not None for times_, jump in forced):
            jumps = None
        num_intervals = None
        if not plan.dense and ts.shape[-1] is not None:
            num_intervals = ts.shape[-1] - 1
            if num_intervals > opts.max_steps:
                raise ValueError(
                    f"`max_steps` must be at least the number of output intervals, "
                    f"len(ts) - 1 = {num_intervals}: with interpolate=False the solver "
                    f"steps onto every output time, so each interval takes at least one "
                    f"step. Received: max_steps={opts.max_steps}"
                )
        args_flat = [_as_arg(a, dtype) for a in tf.nest.flatten(args)]
        if knots is not None:
            # The path in the solve's dtype, as its knots are stops: a float64 path in a
            # float32 solve would jump between stops rounded away from its knots.
            num = len(_signals.Pieces._fields)
            args_flat[:num] = [tf.cast(a, dtype) for a in args_flat[:num]]
        controller = StepSizeController(
            rtol=_tolerance("rtol", opts.rtol, y0, y0_flat, dtype),
            atol=_tolerance("atol", opts.atol, y0, y0_flat, dtype),
            safety=opts.safety,
            factor_min=opts.factor_min,
            factor_max=opts.factor_max,
            max_step=None if opts.max_step is None else _as_tensor(opts.max_step, dtype),
            min_step=None if opts.min_step is None else _as_tensor(opts.min_step, dtype),
            force_min_step=opts.force_min_step,
            per_sample=per_sample,
            **({} if opts.controller is None else opts.controller.config()),
        )
        f = _flat_func(func, y0_struct, args, len(args_flat), dtype)
        solver, strategy = opts.method, opts.gradient
        detector = None
        if event is not None:
            if not strategy.supports_events:
                raise ValueError(
                    "`event` needs the gradient of the event's state at a time found during "
                    "the solve, which ACA's replay and naive backpropagation give: use "
                    f'gradient="aca" or "naive". Received: gradient={strategy!r}')
            t0 = ts[0, 0] if times_per_sample else ts[0]
            detector = _events.detector(event, y0_struct, y0_flat, user_args,
                                        len(args_flat) - len(tf.nest.flatten(user_args)),
                                        t0, per_sample, dtype)
        t_shape = y0_flat[0].shape[:1] if per_sample else ()
        jit = _jit.decide(opts.jit_compile, f, dtype, y0_flat, args_flat, strategy.name, t_shape)
        if jit and tf.executing_eagerly() and detector is None:
            # What `f` computes besides `func`: see `_jit.reuse_key`. (An event's condition
            # is a new function each call: its eager compiled solves are not kept.)
            static = (_structure(y0), _structure(args), dtype.name, type(solver),
                      _hashable(solver.options()), type(strategy), _hashable(strategy.options()),
                      per_sample)
            jit = _jit.reuse_key(func, f, dtype, y0_flat, args_flat, static, t_shape)
        trajectory = strategy.solve(
            solver,
            controller,
            f,
            plan,
            y0_flat,
            args_flat,
            step_size=None if opts.step_size is None else _as_tensor(opts.step_size, dtype),
            first_step=None if opts.first_step is None else _as_tensor(opts.first_step, dtype),
            max_steps=opts.max_steps,
            throw=opts.throw,
            jit=jit,
            per_sample=bool(per_sample),
            **({} if jumps is None else {"jumps": jumps}),
            **({} if detector is None else {"event": detector}),
        )
        ys_flat = trajectory.ys
        if times_per_sample:
            mask = tf.transpose(padded)
            ys_flat = [
                tf.where(tf.reshape(mask, tf.concat([tf.shape(mask), [1] * (y.shape.rank - 2)], 0)),
                         tf.stop_gradient(y), y)
                for y in ys_flat
            ]
        if opts.throw:
            ys_flat = raise_on_failure(
                trajectory.status, trajectory.t_final, ys_flat,
                f"max_steps={opts.max_steps}"
                + (f"; {num_intervals} output intervals, each at least one step"
                   if num_intervals is not None else "")
                + ("" if opts.min_step is None else f"; min_step={opts.min_step}"),
            )
        outcome = {}
        if detector is not None:
            ys_flat, found = _events.finish(
                detector, trajectory.found, ys_flat, ts, _last_times(ts, trajectory.found.t[0]),
                times_per_sample, args_flat, stacked=event.max_events is not None)
            outcome = dict(event_t=found.t, event_index=found.index,
                           event_y=tf.nest.pack_sequence_as(
                               y0, [tf.cast(y, y_dtype) for y in found.y]))
        ys_flat = [tf.cast(y, y_dtype) for y in ys_flat]
        return Solution(
            ts=ts,
            ys=tf.nest.pack_sequence_as(y0, ys_flat),
            stats=trajectory.stats,
            status=trajectory.status,
            t_final=trajectory.t_final,
            **outcome,
        )


def _forced_times(name, times, dtype, y0_flat):
    """`step_ts` or `jump_ts` as a tensor of the solve's dtype (None stays None): `(m,)`,
    or `(batch, m)` whose leading axis is the state's batch."""
    if times is None:
        return None
    times = tf.cast(tf.convert_to_tensor(times), dtype)
    batch = y0_flat[0].shape[0] if y0_flat[0].shape.rank else None
    if times.shape.rank == 2 and (y0_flat[0].shape.rank == 0 or (
            batch is not None and times.shape[0] is not None and times.shape[0] != batch)):
        raise ValueError(
            f"`{name}` of shape (batch, m) must have the batch of `y0`'s leading axis "
            f"({batch}). Received: {name} of shape {tuple(times.shape)}")
    return times


def _last_times(ts, like):
    """Each event lane's last output time (`like`: `[E]`): where a lane without an event
    ends."""
    if ts.shape.rank == 2:
        return _outputs.last_times(ts)
    return tf.broadcast_to(ts[-1], tf.shape(like))


def _controlled(func, control, args):
    """`(func, args, knots)` for a solve driven by the path `control`: `func(t, y, u, *args)`
    as `func(t, y, *pieces, *args)`, the path's tensors passed ahead of `args` (so that
    every gradient strategy differentiates them as it does `args`), and `(knots, jumps)`:
    the knots to step onto and whether `func` jumps there."""
    if isinstance(control, _signals.Derivative):
        path, derivative = control.path, True
    elif isinstance(control, _signals.AbstractPath):
        path, derivative = control, False
    else:
        raise TypeError(
            "`control` must be a path: tfaca.LinearPath, RectilinearPath, HermitePath or "
            f"CubicPath. Received: control={control!r}")
    num = len(_signals.Pieces._fields)

    def controlled(t, y, *all_args):
        u = _signals.evaluate(_signals.Pieces(*all_args[:num]), t, derivative)
        return func(t, y, u, *all_args[num:])

    _jit.derived(controlled, func, ("control", derivative))
    return controlled, tuple(path._pieces) + args, (path.times, path.jumps)


def _apply_precision(precision, dtype):
    """`precision="float32"`: a float32 solve turns TensorFlow's TF32 off (process-wide:
    TensorFlow reads the setting when a kernel runs, or when XLA compiles, never per
    operation), so that its matrix products keep float32's precision on GPUs."""
    if (precision == "float32" and dtype == tf.float32
            and tf.config.experimental.tensor_float_32_execution_enabled()):
        tf.config.experimental.enable_tensor_float_32_execution(False)
        logging.getLogger("tfaca").info(
            "tfaca turned TensorFlow's TensorFloat-32 off for this process (precision="
            '"float32", the default): float32 matrix products keep their precision on '
            'GPUs. Pass precision="tf32" to leave it on.')


def _prepare_y0(y0):
    """`(y0_flat, y_dtype, dtype)`: the state's components as tensors of the solve's
    `dtype` (float32 for a float16/bfloat16 state of dtype `y_dtype`)."""
    y0_flat = [tf.convert_to_tensor(y) for y in tf.nest.flatten(y0)]
    if not y0_flat:
        raise ValueError(f"`y0` must hold at least one tensor. Received: y0={y0!r}")
    dtypes = {y.dtype for y in y0_flat}
    if len(dtypes) != 1 or not all(d.is_floating for d in dtypes):
        raise TypeError(
            "`y0` must be floating tensors of one dtype. Received dtypes: "
            f"{sorted(d.name for d in dtypes)}"
        )
    y_dtype = dtypes.pop()
    dtype = tf.float32 if y_dtype in _LOW_PRECISION else y_dtype
    return [tf.cast(y, dtype) for y in y0_flat], y_dtype, dtype


def _check_leading_batch(y0_flat):
    """Refuses `per_sample=True` for a state whose components do not share a leading
    (batch) axis."""
    for y in y0_flat:
        if y.shape.rank == 0 or not y.shape[:1].is_compatible_with(y0_flat[0].shape[:1]):
            raise ValueError(
                "`per_sample=True` needs every component of `y0` to have the batch "
                "as its leading axis. Received: state components of shapes "
                f"{[x.shape for x in y0_flat]}"
            )


def _per_sample_times(ts, y0_flat, opts):
    """`(ts, padded, ts_solved)` for 2-D `ts` (times per sample), checked against the
    state; `padded` marks the entries that repeat their row's last time, and
    `ts_solved` holds them cut off from the gradient."""
    if not opts.interpolate and not opts.per_sample:
        raise ValueError(
            "`ts` of shape (batch, n), times per sample, are read by interpolation: "
            "one solve cannot step onto every sample's times (with per_sample=True "
            "each sample steps onto its own). Received: interpolate=False"
        )
    for y in y0_flat:
        if y.shape.rank == 0 or not y.shape[:1].is_compatible_with(ts.shape[:1]):
            raise ValueError(
                "`ts` of shape (batch, n) needs every component of `y0` to have the "
                f"batch as its leading axis. Received: ts with shape {ts.shape} and "
                f"a state component of shape {y.shape}"
            )
    ts = _same_batch(ts, y0_flat)
    padded = _padded(ts)
    # Padding gets no gradient, nor passes one on (see `ys` in `solve`).
    return ts, padded, tf.where(padded, tf.stop_gradient(ts), ts)


def odeint(func, y0, ts, **kwargs):
    """Solves `dy/dt = func(t, y, *args)` and returns the states at `ts`.

    Same arguments as `tfaca.solve`; returns only `Solution.ys`: the structure of `y0`
    with a leading axis of `len(ts)`, `ys[0]` being `y0`.

    Example:

    ```python
    A = tf.constant([[-0.1, 1.0], [-1.0, -0.1]], tf.float64)
    func = lambda t, y: tf.linalg.matvec(A, y)
    ys = tfaca.odeint(func, tf.constant([1.0, 0.0], tf.float64), tf.linspace(0.0, 5.0, 11))
    ```
    """
    return solve(func, y0, ts, **kwargs).ys

"""`ODELayer`: the Keras glue. It builds `func` from a dynamics layer and calls `solve`."""

import inspect

import keras
import tensorflow as tf

from tfaca import _jit
from tfaca._events import Event
from tfaca._gradients import NaiveGradient
from tfaca._internals import (
    added_losses,
    cast_input,
    in_xla_context,
    keep_inputs_uncast,
    seed_generators,
    sublayers,
)
from tfaca._loop import graph_assert
from tfaca._odeint import solve
from tfaca._options import SolverOptions, revive
from tfaca._solution import failed
from tfaca._paths import CubicPath, Derivative, HermitePath, LinearPath, RectilinearPath

# The paths a layer builds from its series inputs, by the name its config holds.
PATHS = {"linear": LinearPath, "rectilinear": RectilinearPath, "hermite": HermitePath,
         "cubic": CubicPath}


def path_kind(value, kinds=tuple(PATHS), argument="control"):
    """`value` checked as the name of a path kind among `kinds`."""
    if value not in kinds:
        raise ValueError(f"`{argument}` must be one of {', '.join(map(repr, kinds))}. "
                         f"Received: {argument}={value!r}")
    return value


def _parameters(layer):
    try:
        return list(inspect.signature(layer.call).parameters)
    except (TypeError, ValueError):
        return []


def _accepts(layer, argument):
    return argument in _parameters(layer)


def _check_state_first(dynamics):
    """Refuses a `call(self, t, y)` (torchdiffeq's order), which Python would answer
    with "got multiple values for argument 't'"."""
    parameters = _parameters(dynamics)
    if parameters[:1] == ["t"]:
        raise TypeError(
            "`dynamics` must take the state as the first argument of its `call`: "
            "ODELayer calls `dynamics(y, t=t)` (the Keras convention, inputs first). "
            f"Received: dynamics='{dynamics.name}' ({type(dynamics).__name__}) with "
            f"call({', '.join(parameters)}), torchdiffeq's order. Write "
            "`def call(self, y, t)` (or `def call(self, y)` if the field does not "
            "depend on time)."
        )


def _is_shape_pair(shape):
    """Whether a Keras input shape is `[state_shape, times_shape]` (list or tuple)."""
    return isinstance(shape, (list, tuple)) and len(shape) == 2 and all(
        isinstance(s, (list, tuple)) for s in shape
    )


class _OneDraw:
    """Makes every evaluation of the dynamics within one call draw the same random numbers.

    Keras layers draw from a `SeedGenerator` whose `state` variable advances at every
    draw, so each evaluation of the dynamics (trial steps, the ACA replay, the adjoint's
    reverse solve) would see another dropout mask: the field would change from one
    evaluation to the next, the error control would compare stages of different fields,
    and the replay would differentiate another function than the forward computed.
    `evaluate` resets every generator to the state it had when the call began, so the
    field is a deterministic function of `(t, y)` for the whole call.

    The forward solve leaves the generators where one evaluation of the dynamics leaves
    them (one draw ahead), so the next call draws new numbers, as a plain call of the
    dynamics would. Evaluations made after the forward (`replaying`: the gradient's)
    put the state they found back, so that a backward pass, which runs the calls of a
    tape in reverse order, cannot rewind the generators to an earlier call's draw.
    """

    def __init__(self, dynamics):
        self.states = [generator.state for generator in seed_generators(dynamics)]
        self.start = [tf.identity(state.value) for state in self.states]
        self.replaying = False

    def evaluate(self, fn):
        found = [tf.identity(state.value) for state in self.states] if self.replaying else []
        for state, start in zip(self.states, self.start):
            state.assign(start)
        out = fn()
        for state, value in zip(self.states, found):
            state.assign(value)
        return out


def _refuse_added_losses(layers, counts, dynamics):
    """Raises if a layer of the dynamics added a loss (`add_loss`, `activity_regularizer`)
    since `counts` were taken, after removing the added losses so that none is left behind.

    Counting what the call added, rather than looking for `activity_regularizer`
    attributes at build time, catches every way a layer can add a loss (its own
    `add_loss` calls included) and refuses only layers that do add one in this call.
    It fires at the first evaluation, before the solver's loop starts, eagerly and
    while `fit` traces its step. Weight regularizers are not affected: Keras computes
    them from the variables, outside any call.
    """
    offenders = [layer for layer, n in zip(layers, counts) if len(added_losses(layer)) > n]
    if not offenders:
        return
    for layer, n in zip(layers, counts):
        del added_losses(layer)[n:]
    names = ", ".join(
        f"'{layer.name}' ({type(layer).__name__}, "
        + ("activity_regularizer" if layer.activity_regularizer is not None else "add_loss")
        + ")"
        for layer in offenders
    )
    raise ValueError(
        f"`dynamics` must not add losses. Received: dynamics='{dynamics.name}' whose "
        f"layer(s) {names} added a loss while the solver evaluated it. The solver "
        "evaluates the dynamics many times per step, rejected trials included, inside a "
        "tf.while_loop, so such a loss means nothing for the model and cannot leave the "
        "loop. Put the activity regularizer on a layer outside the ODELayer instead "
        "(`ODELayer(..., activity_regularizer=...)` regularizes the solution); weight "
        "regularizers such as `kernel_regularizer` inside the dynamics are fine."
    )


@keras.saving.register_keras_serializable(package="tfaca")
class ODELayer(keras.layers.Layer):
    """Integrates `dy/dt = dynamics(y)` from the input state over `t`.

    The solve runs in a `tf.while_loop` inside Keras' graphs (and under XLA with
    `jit_compile=True`); with the default `gradient="aca"` its gradient replays the
    accepted steps once, so training memory is O(steps x state).

    Args:
        dynamics: a Keras layer or model mapping a state to its time derivative, with the
            same shape: vectors `(batch, features)` or feature maps `(batch, H, W, C)`.
            If its `call` accepts `t`, the current time is passed as a scalar tensor
            (with `per_sample=True`, a `(batch,)` tensor: each sample's own time) by
            keyword, `dynamics(y, t=t)`: write `call(self, y, t)`, not torchdiffeq's
            `forward(self, t, y)` (refused with a TypeError);
            if it accepts `training`, the flag is forwarded. It must not add losses
            (`add_loss`, `activity_regularizer`; see below); weight regularizers are fine.
        t: the integration times: `(t0, t1)` or a longer strictly monotone sequence of
            output times. Default `(0.0, 1.0)`. Ignored when times come as a second input.
        method: solver name (`"dopri5"` default; `"heun_euler"` is the paper's choice
            for images at `rtol = atol = 1e-2`; `"alf"`, the asynchronous leapfrog,
            with `gradient="mali"`; `"kvaerno5"` for stiff dynamics, best as
            `{"name": "kvaerno5", "jacobian": "batch"}` whose Jacobian is one block per
            sample), or a solver object (a built-in with options, such
            as `tfaca.ALF(damping=0.8)`, is saved with them; a user-defined solver
            works, but cannot be saved in a config).
        rtol, atol: relative and absolute tolerances: scalars, or arrays broadcastable to
            the state (per feature, say), as Python or NumPy numbers. Defaults 1e-3 and
            1e-6, those of scipy's `solve_ivp` and of TorchDiffEqPack (the ACA authors'
            code); torchdiffeq's are tighter, 1e-7 and 1e-9. A model's own error
            dwarfs a 1e-3 relative error of its solve, and looser tolerances mean fewer
            steps: training cost follows the number of steps.
        gradient: how the gradient is computed: `"aca"` (default; the exact gradient of
            the accepted steps, memory O(steps x state), one replay of the accepted
            steps), `"naive"` (backpropagation through every trial step, memory
            O(trials x stages x state); for comparison), `"adjoint"` (a reverse solve
            of the continuous adjoint, memory O(state), gradient as accurate as that
            reverse solve) or `"mali"` (with `method="alf"`: exact for the ALF steps,
            memory O(state) whatever the number of steps), or a strategy object:
            `tfaca.ACAGradient(checkpoints=K)` keeps at most `K` states and rebuilds the
            others in the backward pass. Built-ins, with their options, are saved in
            the config; a user-defined strategy cannot be. Every strategy works with
            every output mode and with `per_sample`. The layer builds the strategy
            once; `gradient_strategy` is that instance.
        step_size: fixed step size (required by `"euler"`, `"midpoint"`, `"rk4"`).
        first_step: first trial step; default automatic (one extra evaluation).
        max_step: upper bound on the step size; default None (unbounded), as the error
            control alone is the right judge of a smooth field. Bound it when the field
            has features in time shorter than the steps taken (the error estimate can
            step over them); it costs at least `|t1 - t0| / max_step` steps.
        min_step: lower bound on the step size; default None. A step of `min_step` the
            error control rejects fails the solve (`Status.DT_UNDERFLOW`, naming the
            time), or, with `force_min_step=True`, is accepted and counted in
            `stats.num_forced`.
        force_min_step: see `min_step`; default False.
        step_ts: times the solver steps onto, besides `t` (`(m,)`; see `tfaca.solve`);
            saved in the config as a list.
        jump_ts: times where the field jumps (a switched input or a dose at a known
            time): a step ends just before each and the next starts just after it,
            with the field evaluated afresh, so the error control does not reject a
            cascade of trials there (`(m,)`; saved in the config as a list).
        max_steps: static bound on trial steps per solve (default 1000); it sizes the
            buffers, which under XLA are allocated whole.
        safety: the controller aims at `safety` times the step it predicts would just
            pass, so the next step is rejected less often. Default 0.9, as scipy and
            torchdiffeq.
        factor_min, factor_max: bounds on the factor by which one step may shrink or
            grow the next, which keeps a poor error estimate from collapsing or blowing
            up the step size. Defaults 0.2 and 10, as scipy and torchdiffeq.
        controller: None (default, the integral controller) or a
            `tfaca.PIDController(pcoeff, icoeff, dcoeff)` (see `tfaca.solve`); saved in
            the config as its coefficients.
        throw: if True (default) a failed solve (`max_steps` reached, step underflow,
            non-finite state) raises, since its outputs (NaN after the failure) would
            silently spoil the training; `tfaca.SolveError` eagerly,
            `tf.errors.InvalidArgumentError` in a graph. Under XLA (`jit_compile=True`)
            run-time assertions do not exist, so nothing raises whatever `throw` says:
            watch the `{name}_failures` metric. False lets training go on past failed
            batches (their loss is NaN), which the same metric counts.
        return_sequences: if True, return the state at every time, shaped
            `(batch, len(t), ...)` (Keras RNN naming); else only the last state.
        interpolate: if True (default), the steps follow the error control alone and
            the outputs between the first and the last time are read from the
            solver's continuous extension (fourth order for Dopri5 and Tsit5, cubic
            Hermite otherwise), so many output times cost almost nothing, and times
            may differ per sample. If False, the solver steps onto every output time
            (at least one step per interval), and a times input must hold the same
            times in every row. With two times, `t=(t0, t1)`, both are the same solve.
        jit_compile: whether the solver's loops (the forward integration, ACA's replay,
            the adjoint's reverse solve) run as functions compiled with XLA inside
            Keras' uncompiled graphs (the default `fit` on a CPU, and under every
            `tf.distribute` strategy). `"auto"` (default): for `"aca"` and
            `"adjoint"`, when the dynamics use only operations XLA compiles and, unless
            a GPU is visible, no convolution (XLA runs convolution gradients inside a
            loop slowly on CPU); never in eager calls. True: always; False: never. Same
            results and gradients to rounding; it changes nothing under
            `model.compile(jit_compile=True)`, which compiles everything. See
            docs/speed.md (which compilation to use).
        per_sample: if True, each sample of the batch takes its own steps (its own step
            size, error estimate, accepted and rejected trials; with times per sample,
            it stops at its own last time), as if it were solved alone: a prediction
            then does not depend on the samples it is batched with (a served model
            answers a request the same way alone or in any batch), and a hard sample
            is not under-resolved by the batch's average error. The dynamics receive
            `t` of shape `(batch,)` and must not mix samples (BatchNorm in training
            does). Every gradient mode works with it. The metrics become means over
            the samples. Cost: a batch runs as long as its slowest sample.
            Default False: one step size for the batch, as torchdiffeq and TFP; see
            docs/time_series.md for the measurements behind the default.
        control: None (default), or how the layer interpolates an input signal that
            drives the dynamics, `dy/dt = dynamics([y, u(t)])`: `"linear"`, `"hermite"`
            (cubic Hermite with backward differences) or `"cubic"` (natural cubic
            spline), see `tfaca.LinearPath` and the others. The layer then takes
            `[state, times, values]` or `[state, times, values, mask]`: the signal's
            observations `values` `(batch, n, channels)` (NaN, or False in `mask`, where
            missing; filled from the last observation) at `times` `(batch, n)` (each
            series its own, padded by repeating its last time) or `(n,)`; the solve runs
            from the first time to the last and its outputs are at `times`. `dynamics`
            receives `u(t)` by keyword if its `call` accepts `u`, else the state and `u`
            concatenated along the last axis (vector states), and must return the
            state's shape. Gradients reach `values` (the signal may be the output of
            earlier layers). With times per series, `per_sample=True` lets each sample
            step onto its own observation times only; shared steps stop at every
            series' times. `tfaca.CDELayer` is the neural CDE.
        event: None (default), or a `tfaca.Event` whose condition `condition(t, y)` reads
            the layer's state `(batch, ...)` and returns one value per sample: each
            sample's solve ends where it crosses zero (see `tfaca.solve`), and its
            outputs from then on are its state there. Saved in the config when the
            condition is a function Keras can serialize (registered with
            `keras.saving.register_keras_serializable`). Needs `gradient="aca"` (default)
            or `"naive"`.
        return_event_time: with an `event`, return `[outputs, event_time]`, the second
            `(batch,)` (`(batch, max_events)` with `max_events`): each sample's event
            time (its last time where it had none), differentiable.
        precision: `"float32"` (default): a float32 layer turns TensorFlow's
            TensorFloat-32 off for the process when it first solves, so that matrix
            products and convolutions on Ampere and newer GPUs keep float32's precision
            (TF32 has 10-bit mantissas, about 1e-3 relative, coarser than most `rtol`).
            `"tf32"`: leave TensorFlow's setting as it is. See `tfaca.solve`; a process
            serving the exported model without tfaca keeps TensorFlow's default (TF32
            on), see docs/keras.md.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`,
            `activity_regularizer`, which regularizes the output of the solve, ...).

    Every solver option above (all but `dynamics`, `t` and `return_sequences`) is an
    attribute of the same name (`layer.rtol`; `layer.method` and `layer.gradient` as
    the config holds them, by name); setting one checks it as the constructor does.
    `layer.solver_options` holds them all, checked (a `SolverOptions`).

    Call arguments:
        inputs: the initial state `(batch, ...)`, or `[state, times]` with `times` a
            1-D tensor of output times shared by the batch, or `(batch, num_times)`:
            each sample's own times (irregularly sampled series). Every row starts with
            the common start time, then holds that sample's times in increasing order
            (or every row decreasing), and may end in repeats of its last time:
            padding for samples with fewer observations, which returns the state at the
            last real time, costs no step and passes no gradient (mask it out of the
            loss). One solve, with one step size, serves the batch (per sample with
            `per_sample=True`); each sample is read at its own times by interpolation. Times that break these rules raise
            `tf.errors.InvalidArgumentError` in a graph; under XLA, which has no
            run-time assertions, the solve fails instead (NaN outputs, counted by
            `{name}_failures`). With `interpolate=False` every row must be equal
            (unless `per_sample=True`, with which each sample steps onto its own times).
            Under a mixed-precision policy the state is cast to the compute dtype, as
            Keras casts any input, but the times are not: float16 would round 41.7 to
            41.6875 and merge 1000.1 with 1000.2; they are solved in float32.
        training: forwarded to `dynamics` when its `call` accepts it.

    Randomness inside `dynamics` (Dropout, GaussianNoise, GaussianDropout, SpatialDropout,
    any layer drawing from a `keras.random.SeedGenerator`):
        within one call of the layer every evaluation of `dynamics` draws the same
        numbers: the forward trial steps, the ACA replay, the adjoint's reverse solve
        and the naive gradient all see one dropout mask, as variational dropout in RNNs
        uses one mask per sequence. The layer resets every seed generator of the
        dynamics to its state at the start of the call before each evaluation. The
        vector field is then a deterministic function of `(t, y)` during a solve, which
        adaptive stepping needs (its error estimate compares stages of one field), and
        the gradient is exact for the computed output. After the call the generators
        stand where one evaluation leaves them, so the next call (the next batch) draws
        new numbers. Draws made with `seed=None` (Keras' global generator, which no
        layer tracks) are not fixed and change at every evaluation: give such a layer
        its own `SeedGenerator`.

    Losses inside `dynamics`:
        a loss added during a call of the dynamics (`add_loss`, or an
        `activity_regularizer` on one of its layers) is refused with a ValueError
        naming the layer: it would be added once per evaluation, rejected trials
        included, and from inside the solver's `tf.while_loop`, which it cannot leave
        in `fit`. Regularize activities outside the layer (e.g.
        `ODELayer(..., activity_regularizer=...)` on the solution). Weight regularizers
        (`kernel_regularizer`, ...) inside the dynamics work: they do not depend on the
        state and Keras computes them from the variables.

    Normalization layers inside `dynamics` (BatchNorm):
        in training, with `gradient="aca"`, the moving statistics are restored after
        the forward solve, so trial steps (rejected ones and the step-size search) leave
        no trace; they are then updated by the backward replay, which evaluates
        `dynamics` once per stage of each *accepted* step (in reverse time order).
        A forward pass in training mode without a gradient therefore leaves them
        unchanged. With `gradient="adjoint"` they are restored after the forward too,
        and updated by every evaluation of the adjoint's reverse solve. With
        `gradient="naive"` every evaluation, rejected trials included, updates them, as
        in the paper's naive method. Batch statistics are used in training in every
        evaluation, so forward and replay compute the same map.
        `BatchNormalization(synchronized=True)` cannot run inside the solver's
        `tf.while_loop` under `tf.distribute` (TensorFlow forbids cross-replica
        `merge_call` there); use the unsynchronized layer, whose statistics are
        per replica.

    Metrics:
        `{name}_fevals`, `{name}_steps` and `{name}_failures` (means over the batches of
        an epoch) are reported by `fit`/`evaluate`, so the progress bar and TensorBoard
        show the cost of the solves and whether they succeeded. `{name}_failures` is
        the fraction of solves whose `Solution.status` was a failure (neither `SUCCESS`
        nor `EVENT`): under
        XLA, or with `throw=False`, it is the only sign of a failed solve besides a NaN
        loss.

    Example:

    ```python
    dynamics = keras.Sequential([keras.layers.Dense(64, activation="tanh"),
                                 keras.layers.Dense(16)])
    model = keras.Sequential([keras.Input((16,)), tfaca.ODELayer(dynamics),
                              keras.layers.Dense(10)])
    ```
    """

    def __init__(
        self,
        dynamics,
        t=(0.0, 1.0),
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
        throw=True,
        return_sequences=False,
        interpolate=True,
        jit_compile="auto",
        per_sample=False,
        precision="float32",
        control=None,
        event=None,
        return_event_time=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if event is not None and not isinstance(event, Event):
            raise TypeError(f"`event` must be a tfaca.Event or None. Received: event={event!r}")
        if return_event_time and event is None:
            raise ValueError("`return_event_time=True` needs an `event`. Received: event=None")
        if not isinstance(dynamics, keras.layers.Layer):
            raise TypeError(
                f"`dynamics` must be a keras.layers.Layer. Received: dynamics={dynamics!r}"
            )
        try:
            t = [float(x) for x in t]
        except (TypeError, ValueError) as e:
            raise ValueError(f"`t` must be a sequence of numbers. Received: t={t!r}") from e
        diffs = [b - a for a, b in zip(t, t[1:])]
        if len(t) < 2 or not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
            raise ValueError(
                "`t` must hold at least two strictly increasing or strictly decreasing "
                f"times. Received: t={t}"
            )
        _check_state_first(dynamics)
        self.control = None if control is None else path_kind(
            control, ("linear", "hermite", "cubic"))
        # The solver options, checked by their one declaration. It holds one strategy
        # for every solve: state it keeps (the adjoint's `backward_stats`) is then
        # readable through the layer, and a graph sees one object, not a new one per call.
        self.solver_options = SolverOptions.from_arguments(locals())
        self.dynamics = dynamics
        self.t = t
        self.return_sequences = bool(return_sequences)
        self.event = event
        self.return_event_time = bool(return_event_time)
        self._pass_t = _accepts(dynamics, "t")
        self._pass_u = _accepts(dynamics, "u")
        self._pass_training = _accepts(dynamics, "training")
        # Keras casts every floating input to the compute dtype, times included;
        # `__call__` casts the state as Keras would and leaves the times alone
        # (`_internals.keep_inputs_uncast`).
        keep_inputs_uncast(self)
        self.fevals_tracker = keras.metrics.Mean(name=f"{self.name}_fevals")
        self.steps_tracker = keras.metrics.Mean(name=f"{self.name}_steps")
        self.failures_tracker = keras.metrics.Mean(name=f"{self.name}_failures")

    @property
    def gradient_strategy(self):
        """The `tfaca.AbstractGradient` instance every solve of this layer uses."""
        return self.solver_options.gradient

    def __call__(self, inputs, *args, **kwargs):
        state, *series = self._split(inputs)
        state = cast_input(self, state, self.autocast)
        if not series:
            inputs = state
        else:
            # Converted to tensors (a NumPy array cannot be passed positionally), never
            # cast: `call` solves in float32, or float64 for a float64 state, and builds
            # the control's path in that dtype.
            inputs = type(inputs)([state] + [cast_input(self, x, False) for x in series])
        return super().__call__(inputs, *args, **kwargs)

    def _split(self, inputs):
        """`[state, times]`, or with a control `[state, times, values(, mask)]`, as a list
        of 1 to 4 entries."""
        if self.control is not None:
            if not isinstance(inputs, (list, tuple)) or len(inputs) not in (3, 4):
                raise ValueError(
                    f"An ODELayer with control={self.control!r} takes `inputs` as "
                    "[state, times, values] or [state, times, values, mask]: the initial "
                    "state, the observation times (batch, n) or (n,), the observations "
                    "(batch, n, channels) and optionally their mask. Received: "
                    f"{len(inputs) if isinstance(inputs, (list, tuple)) else 1} input(s)")
            return list(inputs)
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != 2:
                raise ValueError(
                    "`inputs` must be a state tensor or a list [state, times]. "
                    f"Received: {len(inputs)} inputs"
                )
            return list(inputs)
        return [inputs]

    def build(self, input_shape):
        if self.control is not None:
            state_shape = tuple(input_shape[0])
            if not self._pass_u:  # the dynamics see [y, u] concatenated
                state_shape = state_shape[:-1] + (state_shape[-1] + input_shape[2][-1],)
        else:
            state_shape = input_shape[0] if _is_shape_pair(input_shape) else input_shape
        if not self.dynamics.built:
            self.dynamics.build(state_shape)
        self.built = True

    def _times(self, times, dtype):
        if times is None:
            return tf.constant(self.t, dtype)
        times = tf.cast(times, dtype)
        if times.shape.rank == 2 and (self.interpolate or self.per_sample):
            # Times per sample: read from one solve by interpolation, or, with per-sample
            # steps, each sample stops at its own.
            return times
        if times.shape.rank == 2:
            # Stepping onto the outputs, one solve serves the batch: every row must hold
            # the same times.
            differ = tf.reduce_any(tf.not_equal(times, times[:1]), axis=1)
            # Row 0, or, for an empty batch (a replica's share of a short batch), any
            # monotone times: there is no state to solve.
            first = tf.concat([times[:1], tf.range(tf.shape(times)[1], dtype=dtype)[None]], 0)[0]
            if in_xla_context():
                # No assertions under XLA: NaN times make the solve fail (NaN outputs,
                # counted by `{name}_failures`), never solve every row at row 0's times.
                same = tf.logical_not(tf.reduce_any(differ))
                return tf.where(same, first, tf.constant(float("nan"), dtype))
            check = graph_assert(
                tf.logical_not(tf.reduce_any(differ)),
                [
                    f"ODELayer '{self.name}': with interpolate=False every row of the "
                    "times input must be equal, as one solve steps onto the outputs of the "
                    "whole batch. Use interpolate=True (the default) for times per sample, "
                    "or pass the times as one row (a 1-D tensor). Received: times of shape",
                    tf.shape(times),
                    "whose rows",
                    tf.reshape(tf.where(differ), [-1]),
                    "differ from row 0 =",
                    first,
                ],
                summarize=10,
            )
            with tf.control_dependencies([check]):
                times = tf.identity(first)
        return times

    def call(self, inputs, training=None):
        y0, *series = self._split(inputs)
        times = series[0] if series else None
        dtype = tf.float64 if y0.dtype == tf.float64 else tf.float32
        path = self._control_path(series, dtype) if self.control is not None else None
        return self._integrate(y0, times, path, training)

    def _control_path(self, series, dtype):
        """The control's path through `[times, values(, mask)]`, in the solve's dtype."""
        times, values, *mask = series
        return PATHS[self.control](tf.cast(times, dtype), tf.cast(values, dtype), *mask)

    def _integrate(self, y0, times, path, training, derivative=False):
        """The solve of `call`: from `y0` over `times` (None: `self.t`), driven by `path`
        (None: no control; its derivative if `derivative`)."""
        kwargs = {"training": training} if self._pass_training else {}
        layers = sublayers(self.dynamics)
        draws = _OneDraw(self.dynamics)

        def dynamics(t, y, *u):
            extra = dict(kwargs, t=t) if self._pass_t else dict(kwargs)
            if u and self._pass_u:
                extra["u"] = tf.cast(u[0], y.dtype)
            elif u:  # the input's channels after the state's features
                y = tf.concat([y, tf.cast(u[0], y.dtype)], axis=-1)
            return self.dynamics(y, **extra)

        def func(t, y, *u):
            counts = [len(added_losses(layer)) for layer in layers]
            out = draws.evaluate(lambda: dynamics(t, y, *u))
            _refuse_added_losses(layers, counts, self.dynamics)
            return out

        if training is None or isinstance(training, bool):
            # Every call's `func` computes the same (what differs, the draws' start
            # states, are tensors it closes over): eager calls with jit_compile=True
            # reuse their compiled functions.
            _jit.same_as(func, self, training)

        dtype = tf.float64 if y0.dtype == tf.float64 else tf.float32
        ts = self._times(times, dtype)
        control = {} if path is None else {
            "control": Derivative(path) if derivative else path}
        # Under ACA (and the adjoint) the forward solve's evaluations must not update
        # moving statistics (rejected trials would pollute them); the backward pass
        # updates them. Snapshot here, restore after the forward solve. Seed states are
        # `_OneDraw`'s business: restoring them would repeat this call's draw next call.
        restore = []
        if training is True and not isinstance(self.gradient_strategy, NaiveGradient):
            seeds = {id(state) for state in draws.states}
            restore = [
                (v, tf.identity(v.value))
                for v in self.dynamics.non_trainable_variables
                if id(v) not in seeds
            ]
        event = {} if self.event is None else {"event": self.event}
        sol = solve(func, y0, ts, **self.solver_options.arguments(), **control, **event,
                    name=self.name)
        draws.replaying = True
        for variable, value in restore:
            variable.assign(value)
        self.fevals_tracker.update_state(tf.cast(sol.stats.num_fevals, "float32"))
        self.steps_tracker.update_state(tf.cast(sol.stats.num_steps, "float32"))
        self.failures_tracker.update_state(tf.cast(failed(sol.status), "float32"))
        ys = sol.ys
        if not self.return_sequences:
            out = ys[-1]
        else:
            out = tf.transpose(ys, [1, 0] + list(range(2, len(ys.shape))))
        if self.return_event_time:
            # One time per sample (a scalar condition's, the batch's, broadcast).
            t_event, batch = tf.cast(sol.event_t, out.dtype), tf.shape(y0)[:1]
            if self.event.max_events is None:
                t_event = tf.broadcast_to(t_event, batch)
            elif t_event.shape.rank == 1:
                t_event = tf.broadcast_to(t_event[None], tf.concat([batch, tf.shape(t_event)], 0))
            return [out, t_event]
        return out

    def compute_output_shape(self, input_shape):
        if self.control is not None:
            state_shape, times_shape = input_shape[0], input_shape[1]
            num_times = times_shape[-1]
        elif _is_shape_pair(input_shape):
            state_shape, times_shape = input_shape
            num_times = times_shape[-1]
        else:
            state_shape, num_times = input_shape, len(self.t)
        state_shape = tuple(state_shape)
        out = state_shape if not self.return_sequences else (
            (state_shape[0], num_times) + state_shape[1:])
        if not self.return_event_time:
            return out
        slots = () if self.event.max_events is None else (self.event.max_events,)
        return [out, (state_shape[0],) + slots]

    def get_config(self):
        config = {
            "dynamics": keras.saving.serialize_keras_object(self.dynamics),
            "t": list(self.t),
            **self.solver_options.config(),
            "return_sequences": self.return_sequences,
            "control": self.control,
            "event": None if self.event is None else {
                "condition": keras.saving.serialize_keras_object(self.event.condition),
                "direction": self.event.direction, "terminal": self.event.terminal,
                "max_events": self.event.max_events},
            "return_event_time": self.return_event_time,
        }
        base_config = super().get_config()
        return {**base_config, **config}

    @classmethod
    def from_config(cls, config):
        config = revive(config)
        config["dynamics"] = keras.saving.deserialize_keras_object(config["dynamics"])
        if config.get("event") is not None:
            event = dict(config["event"])
            condition = keras.saving.deserialize_keras_object(event.pop("condition"))
            direction = event.pop("direction")
            config["event"] = Event(condition, tuple(direction) if isinstance(
                direction, list) else direction, **event)
        return cls(**config)


def _option_property(name):
    """`ODELayer`'s attribute for solver option `name`: read as a config holds it, set
    through `SolverOptions.replace` (checked)."""

    def get(self):
        return self.solver_options.config_value(name)

    def set(self, value):
        self.solver_options = self.solver_options.replace(**{name: value})

    return property(get, set, doc=SolverOptions.doc(name))


for _name in SolverOptions.names():
    setattr(ODELayer, _name, _option_property(_name))

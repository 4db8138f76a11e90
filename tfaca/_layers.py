"""`ODELayer`: the Keras glue. It builds `func` from a dynamics layer and calls `solve`."""

import inspect

import keras
import tensorflow as tf

from tfaca._gradients import _GRADIENTS, get_gradient
from tfaca._odeint import check_options, solve
from tfaca._solvers import _SOLVERS, get_solver


def _accepts(layer, argument):
    try:
        return argument in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False


def _is_shape_pair(shape):
    """Whether a Keras input shape is `[state_shape, times_shape]` (list or tuple)."""
    return isinstance(shape, (list, tuple)) and len(shape) == 2 and all(
        isinstance(s, (list, tuple)) for s in shape
    )


def _choice(value, getter, registry):
    """A name for a config when `value` is a name or a default built-in, else the object."""
    instance = getter(value)  # raises on an unknown choice
    if isinstance(value, str):
        return value.lower()
    for name, cls in registry.items():
        if type(instance) is cls and _options(instance) == _options(cls()):
            return name
    return instance


def _options(instance):
    return getattr(instance, "options", dict)()


@keras.saving.register_keras_serializable(package="tfaca")
class ODELayer(keras.layers.Layer):
    """Integrates `dy/dt = dynamics(y)` from the input state over `t`.

    The solve runs in a `tf.while_loop` inside Keras' graphs (and under XLA with
    `jit_compile=True`); with the default `gradient="aca"` its gradient replays the
    accepted steps once, so training memory is O(steps x state).

    Args:
        dynamics: a Keras layer or model mapping a state to its time derivative, with the
            same shape: vectors `(batch, features)` or feature maps `(batch, H, W, C)`.
            If its `call` accepts `t`, the current time is passed as a scalar tensor;
            if it accepts `training`, the flag is forwarded.
        t: the integration times: `(t0, t1)` or a longer strictly monotone sequence of
            output times. Default `(0.0, 1.0)`. Ignored when times come as a second input.
        method: solver name (`"dopri5"` default; `"heun_euler"` is the paper's choice
            for images at `rtol = atol = 1e-2`), or a solver object (a user-defined
            solver works, but cannot be saved in a config).
        rtol, atol: tolerances (defaults 1e-3 and 1e-6).
        gradient: `"aca"` (default), `"naive"` or `"adjoint"`, or a strategy object
            (which, unless it is a default built-in, cannot be saved in a config).
        step_size: fixed step size (required by `"euler"`, `"midpoint"`, `"rk4"`).
        first_step: first trial step; default automatic.
        max_steps: static bound on trial steps per solve (default 1000); it sizes the
            buffers, which under XLA are allocated whole.
        return_sequences: if True, return the state at every time, shaped
            `(batch, len(t), ...)` (Keras RNN naming); else only the last state.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: the initial state `(batch, ...)`, or `[state, times]` with `times` a
            1-D tensor of output times, or `(batch, num_times)` whose rows must all be
            equal (one adaptive solve serves the whole batch, with one step size).
        training: forwarded to `dynamics` when its `call` accepts it.

    Normalization layers inside `dynamics` (BatchNorm):
        in training, with `gradient="aca"`, the moving statistics are restored after
        the forward solve, so trial steps (rejected ones and the step-size search) leave
        no trace; they are then updated by the backward replay, which evaluates
        `dynamics` once per stage of each *accepted* step (in reverse time order).
        A forward pass in training mode without a gradient therefore leaves them
        unchanged. With `gradient="naive"` every evaluation, rejected trials included,
        updates them, as in the paper's naive method. Batch statistics are used in
        training in every evaluation, so forward and replay compute the same map.
        `BatchNormalization(synchronized=True)` cannot run inside the solver's
        `tf.while_loop` under `tf.distribute` (TensorFlow forbids cross-replica
        `merge_call` there); use the unsynchronized layer, whose statistics are
        per replica.

    Metrics:
        `{name}_fevals` and `{name}_steps` (means over the batches of an epoch) are
        reported by `fit`/`evaluate`, so the progress bar and TensorBoard show the
        cost of the solves.

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
        max_steps=1000,
        return_sequences=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
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
        check_options(
            method=method, gradient=gradient, rtol=rtol, atol=atol, step_size=step_size,
            first_step=first_step, max_steps=max_steps,
        )
        self.dynamics = dynamics
        self.t = t
        self.method = _choice(method, get_solver, _SOLVERS)
        self.gradient = _choice(gradient, get_gradient, _GRADIENTS)
        self.rtol = rtol
        self.atol = atol
        self.step_size = step_size
        self.first_step = first_step
        self.max_steps = int(max_steps)
        self.return_sequences = bool(return_sequences)
        self._pass_t = _accepts(dynamics, "t")
        self._pass_training = _accepts(dynamics, "training")
        self.fevals_tracker = keras.metrics.Mean(name=f"{self.name}_fevals")
        self.steps_tracker = keras.metrics.Mean(name=f"{self.name}_steps")

    def _split(self, inputs):
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != 2:
                raise ValueError(
                    "`inputs` must be a state tensor or a list [state, times]. "
                    f"Received: {len(inputs)} inputs"
                )
            return inputs[0], inputs[1]
        return inputs, None

    def build(self, input_shape):
        state_shape = input_shape[0] if _is_shape_pair(input_shape) else input_shape
        if not self.dynamics.built:
            self.dynamics.build(state_shape)
        self.built = True

    def _times(self, times, dtype):
        if times is None:
            return tf.constant(self.t, dtype)
        times = tf.cast(times, dtype)
        if times.shape.rank == 2:
            # One solve serves the batch: every row must hold the same times.
            same = tf.reduce_all(tf.equal(times, times[:1]))
            check = tf.debugging.Assert(
                same, ["ODELayer: every row of the times input must be equal."]
            )
            with tf.control_dependencies([check]):
                times = tf.identity(times[0])
        return times

    def call(self, inputs, training=None):
        y0, times = self._split(inputs)
        kwargs = {"training": training} if self._pass_training else {}

        def func(t, y):
            if self._pass_t:
                return self.dynamics(y, t=t, **kwargs)
            return self.dynamics(y, **kwargs)

        dtype = tf.float64 if y0.dtype == tf.float64 else tf.float32
        ts = self._times(times, dtype)
        # Under ACA the forward solve's evaluations must not update moving statistics
        # (rejected trials would pollute them); the backward replay updates them once
        # per accepted stage. Snapshot here, restore after the forward solve.
        restore = []
        if training is True and self.gradient != "naive":
            restore = [(v, tf.identity(v.value)) for v in self.dynamics.non_trainable_variables]
        sol = solve(
            func,
            y0,
            ts,
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            gradient=self.gradient,
            step_size=self.step_size,
            first_step=self.first_step,
            max_steps=self.max_steps,
            name=self.name,
        )
        for variable, value in restore:
            variable.assign(value)
        self.fevals_tracker.update_state(tf.cast(sol.stats.num_fevals, "float32"))
        self.steps_tracker.update_state(tf.cast(sol.stats.num_steps, "float32"))
        ys = sol.ys
        if not self.return_sequences:
            return ys[-1]
        perm = [1, 0] + list(range(2, len(ys.shape)))
        return tf.transpose(ys, perm)

    def compute_output_shape(self, input_shape):
        if _is_shape_pair(input_shape):
            state_shape, times_shape = input_shape
            num_times = times_shape[-1]
        else:
            state_shape, num_times = input_shape, len(self.t)
        state_shape = tuple(state_shape)
        if not self.return_sequences:
            return state_shape
        return (state_shape[0], num_times) + state_shape[1:]

    def get_config(self):
        for argument in ("method", "gradient"):
            if not isinstance(getattr(self, argument), str):
                raise ValueError(
                    f"ODELayer can save `{argument}` in a config only as a name. Received: "
                    f"{argument}={getattr(self, argument)!r}. Pass a name (e.g. "
                    '"dopri5", "adjoint") to save the layer, or rebuild it in code.'
                )
        config = {
            "dynamics": keras.saving.serialize_keras_object(self.dynamics),
            "t": list(self.t),
            "method": self.method,
            "rtol": self.rtol,
            "atol": self.atol,
            "gradient": self.gradient,
            "step_size": self.step_size,
            "first_step": self.first_step,
            "max_steps": self.max_steps,
            "return_sequences": self.return_sequences,
        }
        base_config = super().get_config()
        return {**base_config, **config}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["dynamics"] = keras.saving.deserialize_keras_object(config["dynamics"])
        return cls(**config)

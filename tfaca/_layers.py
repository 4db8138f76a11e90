"""`ODELayer`: the Keras glue. It builds `func` from a dynamics layer and calls `solve`."""

import inspect

import keras
import tensorflow as tf

from tfaca._odeint import solve


def _accepts(layer, argument):
    try:
        return argument in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False


@keras.saving.register_keras_serializable(package="tfaca")
class ODELayer(keras.layers.Layer):
    """Integrates `dy/dt = dynamics(y)` from the input state and returns the final state.

    Args:
        dynamics: a Keras layer or model mapping a state to its time derivative, with the
            same shape. If its `call` accepts `t`, the current time is passed as a scalar.
        t: the integration times: `(t0, t1)` or a longer strictly monotone sequence of
            output times. Default `(0.0, 1.0)`.
        method, rtol, atol, gradient, step_size, first_step, max_steps: as in
            `tfaca.solve`. Defaults: `"dopri5"`, 1e-3, 1e-6, `"aca"`, None, None, 1000.
        return_sequences: if True, return the states at every time in `t` as
            `(batch, len(t), ...)` (Keras RNN naming); else only the last state.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: the initial state `(batch, ...)`.
        training: forwarded to `dynamics` when its `call` accepts it.

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
        t = [float(x) for x in t]
        if len(t) < 2:
            raise ValueError(f"`t` must hold at least two times. Received: t={t}")
        self.dynamics = dynamics
        self.t = t
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.gradient = gradient
        self.step_size = step_size
        self.first_step = first_step
        self.max_steps = max_steps
        self.return_sequences = return_sequences
        self._pass_t = _accepts(dynamics, "t")
        self._pass_training = _accepts(dynamics, "training")

    def build(self, input_shape):
        if not self.dynamics.built:
            self.dynamics.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        kwargs = {"training": training} if self._pass_training else {}

        def func(t, y):
            if self._pass_t:
                return self.dynamics(y, t=t, **kwargs)
            return self.dynamics(y, **kwargs)

        ts = tf.constant(self.t, dtype=inputs.dtype if inputs.dtype.is_floating else tf.float32)
        ys = solve(
            func,
            inputs,
            ts,
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            gradient=self.gradient,
            step_size=self.step_size,
            first_step=self.first_step,
            max_steps=self.max_steps,
            name=self.name,
        ).ys
        if not self.return_sequences:
            return ys[-1]
        perm = [1, 0] + list(range(2, len(ys.shape)))
        return tf.transpose(ys, perm)

    def compute_output_shape(self, input_shape):
        if not self.return_sequences:
            return tuple(input_shape)
        return (input_shape[0], len(self.t)) + tuple(input_shape[1:])

    def get_config(self):
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

"""Keras layers for observed series: `CDELayer` (a neural controlled differential equation,
Kidger et al., 2020) and `ODERNNCell` (the ODE-RNN of Rubanova et al., 2019, a cell for
`keras.layers.RNN`). Both solve through `ODELayer`'s machinery."""

import keras
import tensorflow as tf

from tfaca._internals import cast_input
from tfaca._layers import PATHS, ODELayer, _accepts, path_kind
from tfaca._options import SolverOptions, revive


def _solver_options(kwargs):
    """The solver options among `kwargs`, popped from it."""
    return {name: kwargs.pop(name) for name in SolverOptions.names() if name in kwargs}


class _CDEField(keras.layers.Layer):
    """`dz/dt = vector_field(z) @ dX/dt`: the user's field reshaped to `(batch, units,
    channels)`, times the path's derivative (`u`). Built and saved by `CDELayer`."""

    def __init__(self, vector_field, units, **kwargs):
        super().__init__(**kwargs)
        self.vector_field = vector_field
        self.units = units
        self._pass_training = _accepts(vector_field, "training")

    def build(self, input_shape):
        if not self.vector_field.built:
            self.vector_field.build(input_shape)
        self.built = True

    def call(self, z, u, training=None):
        kwargs = {"training": training} if self._pass_training else {}
        matrix = self.vector_field(z, **kwargs)
        channels = u.shape[-1]
        size = 1
        for dim in matrix.shape[1:]:
            size = None if dim is None or size is None else size * dim
        if size is not None and size != self.units * channels:
            raise ValueError(
                f"The CDELayer's `vector_field` must return units x channels = {self.units} "
                f"x {channels} = {self.units * channels} values per sample (shaped "
                f"(batch, {self.units * channels}) or (batch, {self.units}, {channels})): "
                "one matrix mapping the path's increments to the state's. Received: "
                f"vector_field '{self.vector_field.name}' returned shape {matrix.shape}")
        matrix = tf.reshape(matrix, [-1, self.units, channels])
        return tf.linalg.matvec(matrix, tf.cast(u, matrix.dtype))


@keras.saving.register_keras_serializable(package="tfaca")
class CDELayer(ODELayer):
    """A neural controlled differential equation (Kidger et al., NeurIPS 2020) over an
    observed, irregularly sampled series: `dz = vector_field(z) dX(t)`, where `X`
    interpolates the observations (time as its first channel) and `z(t0) =
    initial(X(t0))`.

    Args:
        vector_field: a Keras layer mapping the hidden state `(batch, units)` to
            `(batch, units * channels)` or `(batch, units, channels)` values: for each
            sample the matrix that maps the path's increments to the state's (Kidger et
            al. end it with `tanh`). `channels` is the path's: the series' channels plus
            one for time (`include_time`), all doubled by `observed_count`; for
            `"rectilinear"`, the series' channels (doubled by `observed_count`) plus
            its own time channel.
        units: the size of the hidden state `z`.
        initial: the layer that maps the first observation `X(t0)` `(batch, channels)` to
            `z(t0)`; default `keras.layers.Dense(units)`.
        path: how the observations are interpolated: `"cubic"` (default; natural cubic
            spline), `"hermite"` (cubic Hermite with backward differences: each piece
            depends only on observations up to its end, so a prediction at time t uses no
            later data), `"linear"` or `"rectilinear"` (time and values move in turn;
            online). See `tfaca.CubicPath` and the others.
        include_time: if True (default), time is the path's first channel, so that the
            model sees how much time passes (Kidger et al.); `"rectilinear"` always has it.
        observed_count: if True, one channel per series channel counts its observations
            so far (the "observational intensity"; useful where missingness is
            informative).
        return_sequences: if True, return `z` at every observation time, `(batch, n,
            units)`; else at the last (each series' last real time), `(batch, units)`.
        per_sample: default True here: each series steps onto its own observation times
            only (with False one step size serves the batch, and every series stops at
            the observation times of all). See `ODELayer`.
        **kwargs: every other solver option of `ODELayer` (`method`, `rtol`, `atol`,
            `gradient`, `jit_compile`, `interpolate`, ...) and base layer arguments.

    Call arguments:
        inputs: `[times, values]` or `[times, values, mask]`: `times` `(batch, n)` (each
            series its own, strictly increasing, padded at the end by repeating its last
            time; padded values are ignored), `values` `(batch, n, channels)` (NaN where
            missing, unless a `mask` `(batch, n, channels)` says which were observed;
            missing values are filled from the last observation).
        training: forwarded to `vector_field` and `initial` when they accept it.

    Example:

    ```python
    field = keras.Sequential([keras.layers.Dense(64, activation="softplus"),
                              keras.layers.Dense(32 * 4, activation="tanh")])
    times, values = keras.Input((50,)), keras.Input((50, 3))
    z = tfaca.CDELayer(field, units=32)([times, values])  # 3 channels + time = 4
    model = keras.Model([times, values], keras.layers.Dense(2)(z))
    ```
    """

    def __init__(self, vector_field, units, initial=None, path="cubic", include_time=True,
                 observed_count=False, return_sequences=False, per_sample=True, **kwargs):
        if not isinstance(vector_field, keras.layers.Layer):
            raise TypeError("`vector_field` must be a keras.layers.Layer. Received: "
                            f"vector_field={vector_field!r}")
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"`units` must be a positive integer. Received: units={units!r}")
        if "control" in kwargs or "dynamics" in kwargs or "t" in kwargs:
            raise TypeError("CDELayer takes `vector_field` and `path`; `dynamics`, `t` and "
                            "`control` are ODELayer's.")
        super().__init__(_CDEField(vector_field, units, name="cde_field",
                                   dtype=kwargs.get("dtype")),
                         return_sequences=return_sequences,
                         per_sample=per_sample, **kwargs)
        self.units = units
        self.path_type = path_kind(path, tuple(PATHS), "path")
        self.include_time = bool(include_time)
        self.observed_count = bool(observed_count)
        if initial is None:
            initial = keras.layers.Dense(units, dtype=self.dtype_policy, name="initial")
        self.initial = initial
        if not isinstance(self.initial, keras.layers.Layer):
            raise TypeError(f"`initial` must be a keras.layers.Layer. Received: "
                            f"initial={initial!r}")
        self._initial_training = _accepts(self.initial, "training")

    @property
    def vector_field(self):
        return self.dynamics.vector_field

    def __call__(self, inputs, *args, **kwargs):
        series = self._split(inputs)
        # Times and values stay as given (never cast to a float16 compute dtype): the
        # path is built and solved in float32, or float64.
        series = [cast_input(self, x, False) for x in series]
        return keras.layers.Layer.__call__(self, series, *args, **kwargs)

    def _split(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) not in (2, 3):
            raise ValueError(
                "A CDELayer takes `inputs` as [times, values] or [times, values, mask]: "
                "the observation times (batch, n), the observations (batch, n, channels) "
                "and optionally their mask. Received: "
                f"{len(inputs) if isinstance(inputs, (list, tuple)) else 1} input(s)")
        return list(inputs)

    def _channels(self, values_channels):
        """The path's channels: the counts double the channels they are built from, which
        include the time channel except for a rectilinear path (which adds its own)."""
        counted = 2 if self.observed_count else 1
        if self.path_type == "rectilinear":
            return values_channels * counted + 1
        return (values_channels + (1 if self.include_time else 0)) * counted

    def build(self, input_shape):
        batch = input_shape[1][0]
        if not self.initial.built:
            self.initial.build((batch, self._channels(input_shape[1][-1])))
        if not self.dynamics.built:
            self.dynamics.build((batch, self.units))
        self.built = True

    def call(self, inputs, training=None):
        times, values, *mask = inputs
        dtype = tf.float64 if self.compute_dtype == "float64" else tf.float32
        times, values = tf.cast(times, dtype), tf.cast(values, dtype)
        if times.shape.rank == 1:
            times = times[None]
        if self.include_time and self.path_type != "rectilinear":
            stamps = times[:, :, None] + tf.zeros_like(values[:, :, :1])
            values = tf.concat([stamps, values], axis=2)
            if mask:
                mask = [tf.concat([tf.ones_like(stamps, tf.bool), tf.cast(mask[0], tf.bool)],
                                  axis=2)]
        path = PATHS[self.path_type](times, values, *mask, observed_count=self.observed_count)
        ts = path.observation_times if self.path_type == "rectilinear" else times
        start = ts[0] if ts.shape.rank == 1 else ts[:, 0]
        kwargs = {"training": training} if self._initial_training else {}
        x0 = tf.cast(path.evaluate(start), self.compute_dtype)
        # In the layer's compute dtype, whatever `initial`'s: the path and the times are
        # solved in the dtype the state sets.
        z0 = tf.cast(self.initial(x0, **kwargs), self.compute_dtype)
        return self._integrate(z0, ts, path, training, derivative=True)

    def compute_output_shape(self, input_shape):
        batch, num_times = input_shape[1][0], input_shape[1][1]
        if self.return_sequences:
            return (batch, num_times, self.units)
        return (batch, self.units)

    def get_config(self):
        config = keras.layers.Layer.get_config(self)
        config.update({
            "vector_field": keras.saving.serialize_keras_object(self.vector_field),
            "units": self.units,
            "initial": keras.saving.serialize_keras_object(self.initial),
            "path": self.path_type,
            "include_time": self.include_time,
            "observed_count": self.observed_count,
            "return_sequences": self.return_sequences,
            **self.solver_options.config(),
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = revive(config)
        for name in ("vector_field", "initial"):
            config[name] = keras.saving.deserialize_keras_object(config[name])
        return cls(**config)


@keras.saving.register_keras_serializable(package="tfaca")
class ODERNNCell(keras.layers.Layer):
    """The ODE-RNN cell (Rubanova et al., NeurIPS 2019), for `keras.layers.RNN`: between a
    series' observations its hidden state follows `dh/ds = dynamics(h)` for the time
    that passed, and at each observation a GRU cell updates it.

    Each step's input is the observation time followed by the observation's features
    (`(batch, 1 + features)`; append a mask or time-since-last features to the features
    if wanted). The first observation of a series starts its clock (no evolution
    before it). Padded steps should be masked (Keras' RNN `mask`, or a
    `keras.layers.Masking` before it): the RNN then carries the state past them.

    Args:
        units: the size of the hidden state.
        dynamics: a Keras layer mapping `(batch, units)` to its time derivative; default
            `Dense(units, tanh)` then `Dense(units)`. Its `call` may accept `t`, the time
            since the last observation.
        **kwargs: solver options of `ODELayer` (`method`, `rtol`, `atol`, `gradient`,
            `per_sample`, `jit_compile`, ...) and base layer arguments.

    Example:

    ```python
    inputs = keras.Input((None, 1 + 3))  # time, then 3 features, per observation
    h = keras.layers.RNN(tfaca.ODERNNCell(32))(inputs)
    ```
    """

    def __init__(self, units, dynamics=None, **kwargs):
        options = _solver_options(kwargs)
        super().__init__(**kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"`units` must be a positive integer. Received: units={units!r}")
        self.units = units
        if dynamics is None:
            dynamics = keras.Sequential([keras.layers.Dense(units, activation="tanh"),
                                         keras.layers.Dense(units)])
        self.ode = ODELayer(dynamics, dtype=self.dtype_policy, name=f"{self.name}_ode",
                            **options)
        self.gru = keras.layers.GRUCell(units, dtype=self.dtype_policy)
        self.state_size = [units, 1]
        self.output_size = units

    @property
    def dynamics(self):
        return self.ode.dynamics

    def build(self, input_shape):
        batch = input_shape[0]
        if not self.ode.built:
            self.ode.build([(batch, self.units), (batch, 2)])
        if not self.gru.built:
            self.gru.build((batch, input_shape[-1] - 1))
        self.built = True

    def get_initial_state(self, batch_size=None):
        return [tf.zeros([batch_size, self.units], self.compute_dtype),
                tf.fill([batch_size, 1], tf.constant(float("-inf"), self.compute_dtype))]

    def call(self, inputs, states, training=None):
        h, last = states[0], states[1]
        t, x = inputs[:, :1], inputs[:, 1:]
        last = tf.where(tf.math.is_finite(last), last, t)  # a series' first observation
        elapsed = tf.cast(t - last, tf.float64 if h.dtype == tf.float64 else tf.float32)
        # Per-sample times from a common start: each series evolves for its own gap.
        h = self.ode([h, tf.concat([tf.zeros_like(elapsed), elapsed], axis=1)],
                     training=training)
        h, _ = self.gru(x, [h], training=training)
        return h, [h, t]

    def get_config(self):
        config = super().get_config()
        config.update({
            "units": self.units,
            "dynamics": keras.saving.serialize_keras_object(self.ode.dynamics),
            **self.ode.solver_options.config(),
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = revive(config)
        config["dynamics"] = keras.saving.deserialize_keras_object(config["dynamics"])
        return cls(**config)

"""The solver options, declared once: `SolverOptions`.

`solve`/`odeint` and `ODELayer` take the same options (`method`, `rtol`, ..., `per_sample`,
`throw`, `jit_compile`, `precision`) as explicit keyword arguments, with the same names and
defaults.
Each option is declared here once: its name, default, check (which also normalizes the
value: a solver name becomes a solver, `max_steps` an int) and a one-line doc, plus how a
config holds it. `solve` and `ODELayer.__init__` build a `SolverOptions` from their own
arguments (`SolverOptions.from_arguments(locals())`); the layer keeps it, passes it to
`solve` in `call` (`arguments()`) and saves it in `get_config` (`config()`).

Adding an option: declare it in `SolverOptions`, add the keyword (with the declared
default) to the signatures of `solve` and `ODELayer.__init__` and document it in both
docstrings (tests/test_options.py checks all three), and read it where it is used.
"""

import collections.abc
import dataclasses
import numbers
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfaca import _jit
from tfaca._control import PIDController
from tfaca._gradients import _GRADIENTS, get_gradient
from tfaca._methods import _SOLVERS, get_solver


def _check_positive(name, value, allow_zero=False, allow_none=False):
    """Checks Python or NumPy values now; tensors are the caller's responsibility."""
    if value is None:
        if allow_none:
            return
        raise ValueError(f"`{name}` must be given. Received: {name}=None")
    if tf.is_tensor(value) and not hasattr(value, "numpy"):
        return  # symbolic: cannot be checked at trace time
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"`{name}` must be a number or an array of numbers. Received: {name}={value!r}")
    bad = (array < 0) if allow_zero else (array <= 0)
    if np.any(bad) or not np.all(np.isfinite(array)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be finite and {bound}. Received: {name}={value!r}")


# Checks: `check(name, value)` returns the value as `SolverOptions` keeps it, or raises
# ValueError/TypeError naming the option.


def _tolerance(name, value):
    for leaf in tf.nest.flatten(value):
        _check_positive(name, leaf, allow_zero=(name == "atol"))
    return value


def _step_or_none(name, value):
    _check_positive(name, value, allow_none=True)
    return value


def _positive_int(name, value):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive Python int. Received: {name}={value!r}")
    return int(value)


def _fraction(name, value):
    if not 0 < value <= 1:
        raise ValueError(f"`{name}` must be in (0, 1]. Received: {name}={value!r}")
    return float(value)


def _at_least_one(name, value):
    if not value >= 1:
        raise ValueError(f"`{name}` must be >= 1. Received: {name}={value!r}")
    return float(value)


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return bool(value)


def _as_given(name, value):
    return value


def _times_or_none(name, value):
    """None, or times: `(m,)`, or `(batch, m)` per sample; numbers, checked finite now
    (tensors in a graph are the caller's)."""
    if value is None:
        return None
    if tf.is_tensor(value) and not hasattr(value, "numpy"):
        if value.shape.rank not in (None, 1, 2) or not value.dtype.is_floating:
            raise ValueError(f"`{name}` must be float times of shape (m,) or (batch, m). "
                             f"Received: {name}={value!r}")
        return value
    try:
        array = np.asarray(value.numpy() if tf.is_tensor(value) else value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim not in (1, 2) or not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must be finite times of shape (m,) or (batch, m). "
                         f"Received: {name}={value!r}")
    return value


def _controller(name, value):
    """None (the integral controller), a `PIDController`, or a config's dict of one."""
    if value is None or isinstance(value, PIDController):
        return value
    if isinstance(value, collections.abc.Mapping):
        return PIDController(**value)
    raise TypeError(
        f"`{name}` must be None (the integral controller) or a tfaca.PIDController. "
        f"Received: {name}={value!r}")


def _precision(name, value):
    if value not in PRECISIONS:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, PRECISIONS))}. Received: {name}={value!r}")
    return value


# `precision`: "float32" keeps float32 solves in full float32 (TensorFlow's TF32 off);
# "tf32" leaves TensorFlow's setting as it is.
PRECISIONS = ("float32", "tf32")


def _plain(value):
    """`value` as a config holds it: Python numbers and nested lists, never NumPy.

    Keras writes NumPy values into a `.keras` file as `{"class_name": "__numpy__", ...}`
    and hands that dict back to `from_config` unchanged, so a layer built from NumPy
    tolerances could be saved but not loaded; `tolist()` keeps every value exactly
    (a float32 scalar becomes the float64 holding the same number).
    """
    if tf.is_tensor(value) and hasattr(value, "numpy"):
        value = value.numpy()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _named(registry):
    """How a config holds a solver or strategy of `registry`: its name, a dict
    `{"name": ..., **options}` for a built-in with other options than its defaults
    (`ACAGradient(checkpoints=8)`, `ALF(damping=0.8)`), else the instance itself (a
    user-defined one, which a config cannot hold)."""

    def to_config(instance):
        for name, cls in registry.items():
            if type(instance) is cls:
                options = instance.options()
                if options == cls().options():
                    return name
                return {"name": name, **_plain(options)}
        return instance

    return to_config


def _option(default, check, doc, to_config=_plain):
    return dataclasses.field(
        default=default, metadata={"check": check, "doc": doc, "to_config": to_config}
    )


@dataclasses.dataclass(frozen=True, eq=False)
class SolverOptions:
    """The options of a solve, checked: one declaration shared by `solve`, `odeint` and
    `ODELayer` (its constructor, `call` and `get_config`).

    Each field is an option with its default; building a `SolverOptions` checks every
    value (ValueError or TypeError naming the option) and keeps it normalized: `method`
    is then the solver instance, `gradient` the strategy instance, `max_steps` an int,
    `safety`, `factor_min` and `factor_max` floats, the flags bools. The full
    documentation of each option is in `tfaca.solve`'s docstring.
    """

    method: Any = _option(
        "dopri5", lambda name, value: get_solver(value),
        "the solver: a name, an `AbstractSolver` class or instance (kept as the instance)",
        _named(_SOLVERS))
    rtol: Any = _option(
        1e-3, _tolerance, "relative tolerance: a scalar, or a structure like `y0` of "
        "values broadcastable to each component")
    atol: Any = _option(1e-6, _tolerance, "absolute tolerance, as `rtol`; may be 0")
    gradient: Any = _option(
        "aca", lambda name, value: get_gradient(value),
        "the gradient strategy: a name, an `AbstractGradient` class or instance (kept "
        "as the instance)", _named(_GRADIENTS))
    step_size: Any = _option(
        None, _step_or_none, "a fixed step size: required by the fixed-step methods, "
        "with an adaptive one it switches the error control off")
    first_step: Any = _option(
        None, _step_or_none, "the first trial step; None chooses it (one more evaluation)")
    max_step: Any = _option(None, _step_or_none, "an upper bound on the step size; None: unbounded")
    min_step: Any = _option(
        None, _step_or_none, "a lower bound on the step size; None: none (steps end only "
        "when they no longer advance time)")
    force_min_step: Any = _option(
        False, _flag, "False: a step of `min_step` that the error control rejects fails "
        "the solve; True: it is accepted and counted (`Stats.num_forced`)")
    step_ts: Any = _option(
        None, _times_or_none, "times the solver steps onto, (m,) or per sample (batch, m)")
    jump_ts: Any = _option(
        None, _times_or_none, "times where `func` jumps: a step ends just before each and "
        "the next starts just after it, with `func` evaluated afresh; (m,) or (batch, m)")
    max_steps: Any = _option(
        1000, _positive_int, "the most trial steps of a solve, a Python int (sizes the "
        "buffers under XLA)")
    safety: Any = _option(
        0.9, _fraction, "the fraction of the step predicted to just pass that the "
        "controller aims at, in (0, 1]")
    factor_min: Any = _option(
        0.2, _fraction, "the least factor by which one step may shrink the next, in (0, 1]")
    factor_max: Any = _option(
        10.0, _at_least_one, "the largest factor by which one step may grow the next, >= 1")
    controller: Any = _option(
        None, _controller, "None: the integral step-size controller; a `tfaca.PIDController`",
        lambda value: None if value is None else value.config())
    interpolate: Any = _option(
        True, _flag, "True: outputs read from the accepted steps' continuous extensions; "
        "False: the solver steps onto every output time")
    per_sample: Any = _option(
        False, _flag, "True: every sample of the batch (leading axis) takes its own steps")
    throw: Any = _option(True, _flag, "True: a failed solve raises")
    jit_compile: Any = _option(
        "auto", _as_given, '"auto", True or False: whether the solver\'s loops run as '
        "functions compiled with XLA inside a graph that is not compiled")
    precision: Any = _option(
        "float32", _precision, '"float32": a float32 solve turns TensorFlow\'s TF32 off, so that '
        'matrix products and convolutions on GPUs keep float32\'s precision; "tf32": '
        "TensorFlow's setting is left as it is")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = field.metadata["check"](field.name, getattr(self, field.name))
            object.__setattr__(self, field.name, value)
        # Rules between options.
        if (self.min_step is not None and self.max_step is not None
                and not tf.is_tensor(self.min_step) and not tf.is_tensor(self.max_step)
                and np.any(np.asarray(self.min_step) > np.asarray(self.max_step))):
            raise ValueError(
                f"`min_step` must not exceed `max_step`. Received: min_step={self.min_step!r}, "
                f"max_step={self.max_step!r}")
        if self.step_size is None and not self.method.adaptive:
            raise ValueError(
                f"`step_size` is required by the fixed-step method {self.method!r}. "
                "Received: step_size=None"
            )
        object.__setattr__(self, "jit_compile", _jit.check_option(self.jit_compile, self.gradient.name))

    @classmethod
    def names(cls):
        """The options' names, in declaration order."""
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def defaults(cls):
        """`{name: default}` of every option."""
        return {field.name: field.default for field in dataclasses.fields(cls)}

    @classmethod
    def doc(cls, name):
        """The one-line doc of option `name`."""
        return {field.name: field.metadata["doc"] for field in dataclasses.fields(cls)}[name]

    @classmethod
    def from_arguments(cls, arguments):
        """The options taken by name from `arguments` (a function's `locals()`), others
        ignored."""
        return cls(**{name: arguments[name] for name in cls.names()})

    def replace(self, **changes):
        """These options with `changes`, checked."""
        return dataclasses.replace(self, **changes)

    def arguments(self):
        """`{name: value}`: keyword arguments of `solve` (the solver and strategy as
        instances, so that a layer's solves share its strategy)."""
        return {name: getattr(self, name) for name in self.names()}

    def config_value(self, name):
        """Option `name` as a config holds it: the solver and the strategy by name where
        they have one (else the object), numbers as Python numbers and lists."""
        field = next(f for f in dataclasses.fields(self) if f.name == name)
        return field.metadata["to_config"](getattr(self, name))

    def config(self):
        """`{name: value}` of every option, plain JSON; ValueError if the solver or the
        strategy is user-defined, which a config cannot hold."""
        config = {name: self.config_value(name) for name in self.names()}
        for name in ("method", "gradient"):
            if not isinstance(config[name], (str, dict)):
                raise ValueError(
                    f"A config can hold `{name}` only as a built-in (a name, or a built-in "
                    f"class with its options). Received: {name}={config[name]!r}. Pass a "
                    'built-in (e.g. "dopri5", tfaca.ACAGradient(checkpoints=8)) to save '
                    "the layer, or rebuild it in code."
                )
        return config


def revive(config):
    """`config` with its option values that Keras stored as objects turned back into
    values: configs saved while `ODELayer.get_config` kept NumPy arrays and tensors hold
    them as Keras' `{"class_name": "__numpy__" or "__tensor__", ...}` dicts."""
    config = dict(config)
    for name in SolverOptions.names():
        value = config.get(name)
        if isinstance(value, dict) and value.get("class_name") in ("__numpy__", "__tensor__"):
            config[name] = keras.saving.deserialize_keras_object(value)
    method = config.get("method")
    if isinstance(method, dict) and isinstance(method.get("jac"), dict):
        # An implicit solver's `jac`, saved as Keras saves a function (registered, or a
        # lambda loaded with `safe_mode=False`).
        config["method"] = {**method, "jac": keras.saving.deserialize_keras_object(method["jac"])}
    return config


# torchdiffeq's names for options that tfaca calls otherwise.
_TORCHDIFFEQ_NAMES = {"max_num_steps": "max_steps", "ifactor": "factor_max",
                      "dfactor": "factor_min"}


def options_refusal(options):
    """The message refusing torchdiffeq's `options=dict(...)`, with the keywords to use."""
    if isinstance(options, collections.abc.Mapping):
        spelled = ", ".join(f"{_TORCHDIFFEQ_NAMES.get(k, k)}={v!r}" for k, v in options.items())
    else:
        spelled = "step_size=..., first_step=..."
    return (
        "`options` is not an argument of tfaca's solve/odeint: pass each option as a "
        f"keyword argument, e.g. `odeint(func, y0, ts, {spelled})` (`step_size`, "
        "`first_step`, `max_step`, `max_steps`, `safety`, `factor_min`, `factor_max`; "
        "torchdiffeq's max_num_steps, ifactor and dfactor are max_steps, factor_max and "
        f"factor_min). Received: options={options!r}"
    )

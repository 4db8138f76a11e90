"""The solver options' one declaration (`tfaca._options.SolverOptions`): `solve` and
`ODELayer` take every option as an explicit keyword with the declared default and
document it; the checks and normalizations; layer attributes; configs of today load."""

import inspect
import re

import keras
import numpy as np
import pytest

import tfaca
from tfaca._options import SolverOptions, revive

STATE = 4


# Each test starts from a fresh Keras session and seed (conftest.py).
pytestmark = pytest.mark.usefixtures("keras_seed")


def mlp_dynamics(name="dyn"):
    return keras.Sequential(
        [keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(STATE)], name=name
    )


SIGNATURES = [tfaca.solve, tfaca.ODELayer.__init__]
SIGNATURE_IDS = ["solve", "ODELayer"]


@pytest.mark.parametrize("function", SIGNATURES, ids=SIGNATURE_IDS)
def test_every_option_is_an_explicit_keyword_with_its_declared_default(function):
    parameters = inspect.signature(function).parameters
    for name, default in SolverOptions.defaults().items():
        assert name in parameters, f"{function.__qualname__} lacks the option `{name}`"
        parameter = parameters[name]
        assert parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        assert type(parameter.default) is type(default) and parameter.default == default, name


def _documented(docstring):
    """The argument names that the docstring's Args section documents (`name:` or
    `name, other:` entries)."""
    lines = docstring.split("\n    Args:\n", 1)[1].splitlines()
    names = []
    for line in lines:
        if line.strip() and not line.startswith("      "):
            break  # the next section
        entry = re.match(r"^ {8}([\w*][\w*, ]*):", line)
        if entry:
            names += [n.strip().lstrip("*") for n in entry.group(1).split(",")]
    return names


@pytest.mark.parametrize("obj", [tfaca.solve, tfaca.ODELayer], ids=SIGNATURE_IDS)
def test_every_option_is_documented(obj):
    documented = _documented(obj.__doc__)
    missing = [name for name in SolverOptions.names() if name not in documented]
    assert not missing, missing


def test_options_are_checked_and_normalized():
    options = SolverOptions(method="Tsit5", gradient=tfaca.NaiveGradient, max_steps=np.int64(7),
                            safety=np.float32(0.5), per_sample=np.bool_(True))
    assert isinstance(options.method, tfaca.Tsit5)
    assert isinstance(options.gradient, tfaca.NaiveGradient)
    assert type(options.max_steps) is int and options.max_steps == 7
    assert type(options.safety) is float and options.safety == 0.5
    assert options.per_sample is True
    assert options.config()["method"] == "tsit5" and options.config()["gradient"] == "naive"
    # A built-in with options is named with them; the same instances stay.
    options = SolverOptions(method=tfaca.ALF(damping=0.8), gradient=tfaca.ACAGradient(checkpoints=4))
    assert options.config_value("method") == {"name": "alf", "damping": 0.8}
    assert options.config_value("gradient") == {"name": "aca", "checkpoints": 4}
    assert options.replace(rtol=1e-5).gradient is options.gradient


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(per_sample="yes"), TypeError, "`per_sample` must be True or False"),
        (dict(throw=1), TypeError, "`throw` must be True or False"),
        (dict(interpolate=None), TypeError, "`interpolate` must be True or False"),
        (dict(method="rk4"), ValueError, "`step_size` is required"),
        (dict(jit_compile=True, gradient="naive"), ValueError, "`jit_compile=True`"),
        (dict(min_step=-1.0), ValueError, "`min_step` must be finite and > 0"),
        (dict(min_step=0.5, max_step=0.1), ValueError, "`min_step` must not exceed `max_step`"),
        (dict(force_min_step="yes"), TypeError, "`force_min_step` must be True or False"),
        (dict(step_ts=[[[0.5]]]), ValueError, r"`step_ts` must be finite times of shape \(m,\)"),
        (dict(jump_ts=[0.5, np.nan]), ValueError, "`jump_ts` must be finite times"),
        (dict(jump_ts=np.ones((3, 1))), ValueError,
         r"`jump_ts` of shape \(batch, m\) must have the batch of `y0`'s leading axis \(2\)"),
        (dict(precision="highest"), ValueError,
         "`precision` must be one of 'float32', 'tf32'. Received: precision='highest'"),
    ],
)
def test_solve_refuses_bad_options_by_name(changes, error, match):
    with pytest.raises(error, match=match):
        tfaca.solve(lambda t, y: -y, np.ones(2), [0.0, 1.0], **changes)


def test_layer_attributes_are_the_options_and_setting_one_checks_it():
    layer = tfaca.ODELayer(mlp_dynamics(), method="Tsit5", rtol=1e-4, per_sample=True)
    assert layer.method == "tsit5" and layer.rtol == 1e-4 and layer.per_sample is True
    assert layer.gradient == "aca" and layer.jit_compile == "auto"
    with pytest.raises(ValueError, match="`rtol` must be finite and > 0"):
        layer.rtol = -1.0
    assert layer.rtol == 1e-4
    strategy = layer.gradient_strategy
    layer.atol = 1e-8
    assert layer.gradient_strategy is strategy  # the same strategy for every solve
    layer.gradient = "adjoint"
    assert isinstance(layer.gradient_strategy, tfaca.AdjointGradient)
    assert layer.get_config()["gradient"] == "adjoint"
    assert layer.get_config()["atol"] == 1e-8


def test_solve_gets_the_layer_options():
    layer = tfaca.ODELayer(mlp_dynamics(), method="rk4", step_size=0.25, t=(0.0, 0.5, 1.0),
                           return_sequences=True, jit_compile=False)
    x = np.random.default_rng(0).normal(size=(3, STATE)).astype("float32")
    out = layer(x).numpy()
    expected = tfaca.odeint(lambda t, y: layer.dynamics(y), x, [0.0, 0.5, 1.0], method="rk4",
                            step_size=0.25, jit_compile=False)
    np.testing.assert_array_equal(out, np.transpose(expected.numpy(), (1, 0, 2)))


# Option entries of configs written by `ODELayer.get_config` before the options had one
# declaration (commit 30fce51): they must load, and save again the same.
TODAY = {
    "alf_ode": {
        "t": [0.0, 1.0], "method": {"name": "alf", "damping": 0.8}, "rtol": 9.999999747378752e-05,
        "atol": [1e-05, 1e-06, 1e-05, 1e-07], "gradient": "mali", "step_size": None,
        "first_step": 0.05, "max_step": 0.5, "max_steps": 500, "safety": 0.8,
        "factor_min": 0.3, "factor_max": 4.0, "throw": False, "return_sequences": True,
        "interpolate": False, "jit_compile": False, "per_sample": False,
    },
    "budget_ode": {
        "t": [0.0, 0.5, 1.0], "method": "tsit5", "rtol": 0.001, "atol": 1e-06,
        "gradient": {"name": "aca", "checkpoints": 8}, "step_size": None, "first_step": None,
        "max_step": None, "max_steps": 1000, "safety": 0.9, "factor_min": 0.2,
        "factor_max": 10.0, "throw": True, "return_sequences": False, "interpolate": False,
        "jit_compile": True, "per_sample": False,
    },
    "rk4_ode": {
        "t": [0.0, 0.25, 1.0], "method": "rk4", "rtol": 0.001, "atol": 1e-06, "gradient": "aca",
        "step_size": 0.1, "first_step": None, "max_step": None, "max_steps": 1000,
        "safety": 0.9, "factor_min": 0.2, "factor_max": 10.0, "throw": True,
        "return_sequences": True, "interpolate": True, "jit_compile": "auto", "per_sample": True,
    },
}


@pytest.mark.parametrize("name", list(TODAY))
def test_configs_of_today_load_and_save_the_same(name):
    config = {"name": name, "trainable": True, "dtype": "float32",
              "dynamics": keras.saving.serialize_keras_object(mlp_dynamics()), **TODAY[name]}
    layer = tfaca.ODELayer.from_config(config)
    saved = layer.get_config()
    assert {k: saved[k] for k in TODAY[name]} == TODAY[name]
    # and the options declared since (issue 28's precision, issue 29's control, issue
    # 30's events, issue 31's step control), at their defaults
    assert set(saved) == set(config) | {"precision", "control", "event", "return_event_time",
                                        "controller", "min_step", "force_min_step",
                                        "step_ts", "jump_ts"}
    assert saved["precision"] == "float32" and saved["control"] is None
    assert saved["event"] is None and saved["return_event_time"] is False
    assert saved["controller"] is None and saved["min_step"] is None
    assert saved["force_min_step"] is False
    assert saved["step_ts"] is None and saved["jump_ts"] is None


def test_configs_older_than_an_option_load_with_its_default():
    config = {"name": "old", "dynamics": keras.saving.serialize_keras_object(mlp_dynamics()),
              **{k: v for k, v in TODAY["rk4_ode"].items()
                 if k not in ("interpolate", "jit_compile", "per_sample")}}
    layer = tfaca.ODELayer.from_config(config)
    assert (layer.interpolate, layer.jit_compile, layer.per_sample, layer.precision) == (
        True, "auto", False, "float32")


def test_revive_reads_values_keras_stored_as_objects():
    config = {"atol": keras.saving.serialize_keras_object(np.array([1e-5, 1e-6])),
              "method": {"name": "alf", "damping": 0.8}, "t": [0.0, 1.0]}
    revived = revive(config)
    np.testing.assert_array_equal(revived["atol"], [1e-5, 1e-6])
    assert revived["method"] == {"name": "alf", "damping": 0.8}
    assert "class_name" in config["atol"]  # the caller's dict is left alone

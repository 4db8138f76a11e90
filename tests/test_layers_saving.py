"""Saving an `ODELayer`: configs and serialization, `.keras` files, and SavedModel export
served without tfaca (and without Keras)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import BATCH, IRREGULAR, STATE, mlp_dynamics, regression_data

# Each test starts from a fresh Keras session and seed (conftest.py).
pytestmark = pytest.mark.usefixtures("keras_seed")


# --------------------------------------------------------------------------------------
# Configs, serialization and .keras files
# --------------------------------------------------------------------------------------


NON_DEFAULT = dict(
    t=(0.0, 0.4, 1.0),
    method="bosh3",
    rtol=1e-4,
    atol=1e-5,
    gradient="naive",
    step_size=None,
    first_step=0.05,
    max_step=0.3,
    max_steps=321,
    safety=0.8,
    factor_min=0.3,
    factor_max=4.0,
    throw=False,
    return_sequences=True,
    jit_compile=False,
    per_sample=True,
    name="my_ode",
)


FIXED_STEP = dict(t=(0.0, 0.5), method="rk4", step_size=0.1, jit_compile=True, name="fixed_ode")


# NumPy values, as a user computing tolerances per feature passes them: scalars of
# either float type and per-element arrays. A config must hold them as plain numbers.
NUMPY = dict(
    rtol=np.float32(1e-4),
    atol=np.array([1e-5, 1e-6, 1e-5, 1e-7]),
    first_step=np.float64(0.05),
    name="numpy_ode",
)


CONFIGS = [NON_DEFAULT, FIXED_STEP, NUMPY]
CONFIG_IDS = ["adaptive", "fixed", "numpy"]


def _built_layer(kwargs):
    layer = tfaca.ODELayer(mlp_dynamics(name="dyn"), **kwargs)
    x = np.random.default_rng(0).normal(size=(BATCH, STATE)).astype("float32")
    return layer, x, layer(x).numpy()


def _check_values(config, kwargs):
    for key, value in kwargs.items():
        if key == "t":
            assert config["t"] == list(value)
        elif isinstance(value, (np.ndarray, np.generic)):
            # The same numbers, as Python floats or lists of them.
            assert type(config[key]) is (list if np.ndim(value) else float), key
            np.testing.assert_array_equal(np.asarray(config[key], value.dtype), value)
        else:
            assert config[key] == value, key
    json.dumps(config)  # plain JSON, without Keras' encoder for NumPy values


@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.slow_variants
def test_get_config_from_config(kwargs):
    layer, x, out = _built_layer(kwargs)
    config = layer.get_config()
    _check_values(config, kwargs)
    clone = tfaca.ODELayer.from_config(config)
    assert clone.get_config() == config
    clone(x)  # build
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x).numpy(), out)
    if kwargs.get("return_sequences"):
        assert out.shape == (BATCH, 3, STATE)


def _json(config):
    """A config in JSON's normal form (tuples become lists), as stored in files."""
    return json.loads(json.dumps(config))


@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
def test_serialize_through_json(kwargs):
    layer, x, out = _built_layer(kwargs)
    text = json.dumps(keras.saving.serialize_keras_object(layer))
    restored = keras.saving.deserialize_keras_object(json.loads(text))
    assert isinstance(restored, tfaca.ODELayer)
    assert _json(restored.get_config()) == _json(layer.get_config())
    restored(x)
    restored.set_weights(layer.get_weights())
    np.testing.assert_array_equal(restored(x).numpy(), out)


def test_from_config_reads_arrays_as_keras_serializes_them():
    """Configs saved while `get_config` kept NumPy arrays (or tensors) hold Keras'
    `{"class_name": "__numpy__" or "__tensor__", ...}` dicts; they load, same values."""
    layer, x, out = _built_layer(NUMPY)
    config = layer.get_config()
    config["atol"] = keras.saving.serialize_keras_object(NUMPY["atol"])
    config["first_step"] = keras.saving.serialize_keras_object(tf.constant(NUMPY["first_step"]))
    assert config["atol"]["class_name"] == "__numpy__"
    assert config["first_step"]["class_name"] == "__tensor__"
    clone = tfaca.ODELayer.from_config(_json(config))
    _check_values(clone.get_config(), {k: v for k, v in NUMPY.items() if k != "name"})
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x).numpy(), out)


def test_config_of_a_solver_instance_and_gradient_class():
    layer = tfaca.ODELayer(mlp_dynamics(), method=tfaca.Tsit5(), gradient=tfaca.NaiveGradient)
    config = layer.get_config()
    assert config["method"] == "tsit5"
    assert config["gradient"] == "naive"
    json.dumps(keras.saving.serialize_keras_object(layer))


class _MyGradient(tfaca.ACAGradient):
    """A user-defined strategy (a subclass of a built-in is not the built-in)."""


class _Ralston(tfaca.AbstractSolver):
    tableau = tfaca.ButcherTableau(c=(0.0, 2 / 3), a_lower=((2 / 3,),), b_sol=(0.25, 0.75))
    order = 2
    error_order = None


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"method": _Ralston(), "step_size": 0.1}, "method"),
        ({"gradient": _MyGradient()}, "gradient"),
    ],
    ids=["user_solver", "user_gradient"],
)
def test_objects_that_a_config_cannot_hold_work_but_refuse_to_save(kwargs, argument):
    layer = tfaca.ODELayer(mlp_dynamics(), **kwargs)
    x = np.random.default_rng(0).normal(size=(4, 4)).astype("float32")
    expected = tfaca.odeint(lambda t, y: layer.dynamics(y), x, [0.0, 1.0], **kwargs)[-1]
    np.testing.assert_allclose(layer(x).numpy(), expected.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        layer.get_config()


@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.slow_variants
def test_keras_file_round_trip(tmp_path, kwargs):
    x, _ = regression_data(n=BATCH)
    model = keras.Sequential(
        [keras.Input((STATE,)), keras.layers.Dense(STATE),
         tfaca.ODELayer(mlp_dynamics(name="dyn"), **kwargs), keras.layers.Flatten(),
         keras.layers.Dense(2)]
    )
    # Move the weights away from their initial values so loading has to restore them.
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    model.fit(x, np.ones((len(x), 2), "float32"), epochs=1, verbose=0)
    expected = model(x).numpy()
    path = tmp_path / "model.keras"
    model.save(path)
    keras.backend.clear_session()
    keras.utils.set_random_seed(123)  # a fresh model would get other weights
    loaded = keras.models.load_model(path)
    ode = loaded.layers[1]
    assert isinstance(ode, tfaca.ODELayer)
    assert _json(ode.get_config()) == _json(model.layers[1].get_config())
    assert len(loaded.weights) == len(model.weights) > 0
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded(x).numpy(), expected)


# --------------------------------------------------------------------------------------
# SavedModel export, served without tfaca
# --------------------------------------------------------------------------------------


_SERVE = """
import json
import sys
sys.modules["tfaca"] = None  # any attempt to import tfaca fails
{block_keras}
try:
    import tfaca  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("tfaca is importable")
import numpy as np
import tensorflow as tf
# As docs/keras.md says a server without tfaca should: float32 products in full float32 on
# a GPU, as the model was trained (TensorFlow's default, TF32, differs by ~1e-3 on an H100).
tf.config.experimental.enable_tensor_float_32_execution(False)
for job in json.load(open(sys.argv[1])):
    served = tf.saved_model.load(job["dir"])
    inputs = [tf.constant(np.load(name)) for name in job["inputs"]]
    try:
        out = served.serve(inputs[0] if len(inputs) == 1 else inputs)
    except tf.errors.InvalidArgumentError as e:
        open(job["out"] + ".error", "w").write(str(e))
    else:
        np.save(job["out"], out.numpy())
loaded = {{m.split(".")[0] for m, v in sys.modules.items() if v is not None}}
assert "tfaca" not in loaded, "tfaca was loaded"
"""


def _serve_elsewhere(tmp_path, jobs, block_keras=False):
    """Serves `[(export_dir, [inputs...]), ...]` in a fresh Python that cannot import
    tfaca (nor keras, if asked); returns each output, or the InvalidArgumentError text."""
    specs = []
    for k, (export_dir, inputs) in enumerate(jobs):
        names = []
        for n, x in enumerate(inputs):
            names.append(str(tmp_path / f"job{k}_in{n}.npy"))
            np.save(names[-1], x)
        specs.append({"dir": str(export_dir), "inputs": names, "out": str(tmp_path / f"job{k}_out.npy")})
    (tmp_path / "jobs.json").write_text(json.dumps(specs))
    script = _SERVE.format(block_keras='sys.modules["keras"] = None' if block_keras else "")
    env = dict(os.environ)
    # Nothing on the path that holds tfaca (this checkout); the rest stays (a TensorFlow
    # installed there, as on the lent GPU machines).
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in env.get("PYTHONPATH", "").split(os.pathsep)
        if p and not os.path.isdir(os.path.join(p, "tfaca")))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(tmp_path / "jobs.json")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    outputs = []
    for spec in specs:
        if os.path.exists(spec["out"]):
            outputs.append(np.load(spec["out"]))
        else:
            with open(spec["out"] + ".error") as f:
                outputs.append(f.read())
    return outputs


def _export_model():
    x, y = regression_data(n=48)
    model = keras.Sequential(
        [keras.Input((STATE,)), keras.layers.Dense(STATE, activation="tanh"),
         tfaca.ODELayer(mlp_dynamics(), rtol=1e-4, atol=1e-6), keras.layers.Dense(3)]
    )
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    model.fit(x, np.repeat(y, 3, axis=1), batch_size=BATCH, epochs=1, verbose=0)
    return model, x


def _export_times_model():
    state, times = keras.Input((STATE,)), keras.Input((len(IRREGULAR),))
    layer = tfaca.ODELayer(mlp_dynamics(), rtol=1e-4, atol=1e-6, return_sequences=True)
    return keras.Model([state, times], keras.layers.Flatten()(layer([state, times])))


@pytest.mark.slow  # 33 s; the quick suite serves exports in process (test_examples, adjoint)
def test_export_serves_without_tfaca(tmp_path):
    model, x = _export_model()
    export_dir = tmp_path / "served"
    model.export(str(export_dir), verbose=False)
    times_model = _export_times_model()
    times_dir = tmp_path / "served_times"
    times_model.export(str(times_dir), verbose=False)
    ts = np.tile(IRREGULAR, (12, 1))
    own_ts = ts.copy()
    own_ts[5, 3] += 0.01  # times per sample
    own_ts[7, 3:] = own_ts[7, 2]  # and padding
    bad_ts = ts.copy()
    bad_ts[5, 3] = bad_ts[5, 1]  # not increasing
    batches = [x[:20], x[20:27]]  # whole batches, of two sizes
    jobs = [(export_dir, [b]) for b in batches]
    jobs += [(times_dir, [x[:12], ts]), (times_dir, [x[:12], bad_ts]),
             (times_dir, [x[:12], own_ts])]
    served = _serve_elsewhere(tmp_path, jobs)
    for batch, out in zip(batches, served):
        assert isinstance(out, np.ndarray), out
        assert out.shape == (len(batch), 3)
        np.testing.assert_allclose(out, model(batch).numpy(), rtol=1e-5, atol=1e-5)
    assert isinstance(served[2], np.ndarray), served[2]
    assert served[2].shape == (12, len(IRREGULAR) * STATE)
    np.testing.assert_allclose(served[2], times_model([x[:12], ts]).numpy(), rtol=1e-5, atol=1e-5)
    # The served graph still checks the times, and reads each sample at its own.
    assert isinstance(served[3], str) and "`ts` of shape (batch, n)" in served[3]
    assert isinstance(served[4], np.ndarray), served[4]
    np.testing.assert_allclose(served[4], times_model([x[:12], own_ts]).numpy(), rtol=1e-5,
                               atol=1e-5)


def _exported_adjoint_model(tmp_path):
    """A model with an adjoint layer, exported, and its server. The adjoint's counters
    (tf.Variables its solves capture) were "untracked resources" to `model.export`."""
    x, y = regression_data(n=BATCH)
    ode = tfaca.ODELayer(mlp_dynamics(), gradient="adjoint", rtol=1e-4, atol=1e-6,
                         jit_compile=False)
    model = keras.Sequential([keras.Input((STATE,)), ode, keras.layers.Dense(1)])
    model.export(str(tmp_path / "served"), verbose=False)
    return model, tf.saved_model.load(str(tmp_path / "served")), x, y


def test_export_of_an_adjoint_layer_serves(tmp_path):
    model, served, x, _ = _exported_adjoint_model(tmp_path)
    np.testing.assert_allclose(served.serve(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_export_of_an_adjoint_layer_keeps_its_counters_for_training(tmp_path):
    model, _, x, y = _exported_adjoint_model(tmp_path)
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    counters = model.layers[0].gradient_strategy.backward_stats
    assert int(counters.num_steps) > 0 and int(counters.num_fevals) > int(counters.num_steps)


@pytest.mark.slow  # test_export_serves_without_tfaca serves the same model in the suite
def test_export_serves_without_keras(tmp_path):
    """README: "serving needs TensorFlow only"."""
    model, x = _export_model()
    export_dir = tmp_path / "served"
    model.export(str(export_dir), verbose=False)
    (out,) = _serve_elsewhere(tmp_path, [(export_dir, [x[:10]])], block_keras=True)
    assert isinstance(out, np.ndarray), out
    np.testing.assert_allclose(out, model(x[:10]).numpy(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Memory knobs in configs and SavedModels
# --------------------------------------------------------------------------------------


def _dynamics():
    return keras.Sequential([keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(4)])


@pytest.mark.parametrize(
    "kwargs, method, gradient",
    [
        (dict(method=tfaca.ALF(damping=0.8), gradient="mali", rtol=1e-2, atol=1e-3),
         {"name": "alf", "damping": 0.8}, "mali"),
        (dict(gradient=tfaca.ACAGradient(checkpoints=3)), "dopri5",
         {"name": "aca", "checkpoints": 3}),
        (dict(gradient=tfaca.AdjointGradient(rtol=1e-6)), "dopri5",
         {"name": "adjoint", "rtol": 1e-6, "atol": None, "max_steps": None, "norm": "full"}),
    ],
    ids=["alf_mali", "aca_budget", "adjoint_options"],
)
def test_layer_config_holds_built_ins_with_options(kwargs, method, gradient):
    layer = tfaca.ODELayer(_dynamics(), **kwargs)
    config = layer.get_config()
    assert config["method"] == method and config["gradient"] == gradient
    restored = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(layer))))
    assert restored.get_config() == config
    assert repr(restored.gradient_strategy) == repr(layer.gradient_strategy)


@pytest.mark.parametrize(
    "kwargs",
    [dict(method="alf", gradient="mali", rtol=1e-2, atol=1e-3),
     dict(gradient=tfaca.ACAGradient(checkpoints=2))],
    ids=["mali", "budget"],
)
@pytest.mark.slow_variants
def test_layer_fits_saves_and_serves(tmp_path, kwargs):
    """model.fit, a .keras round trip and a SavedModel served, with MALI and a budget."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = np.sin(x).sum(axis=1, keepdims=True).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
                              tfaca.ODELayer(_dynamics(), **kwargs), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    history = model.fit(x, y, epochs=6, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0]
    expected = model(x).numpy()
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(loaded(x).numpy(), expected)
    model.export(str(tmp_path / "saved"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(served.serve(x).numpy(), expected, rtol=1e-5, atol=1e-6)

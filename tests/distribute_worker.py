"""Subprocess helper for tests/test_distribute.py: trains an `ODELayer` model under a
`tf.distribute` strategy and reports the result.

Run as a script, one mode per process, because each strategy needs TensorFlow set up
before its devices (or its gRPC server) exist:

    python distribute_worker.py mirrored [SCENARIO,...]
        MirroredStrategy over two logical CPU devices of this process; runs the named
        scenarios of MIRRORED_SCENARIOS (default: all) and prints one JSON line prefixed
        with RESULT.

    python distribute_worker.py multiworker OUT_DIR INIT_NPZ
        MultiWorkerMirroredStrategy, the cluster taken from TF_CONFIG. Starts from the
        weights in INIT_NPZ, writes OUT_DIR/worker{index}_{rk4,dopri5}.npz and prints
        a RESULT line.

The model and data builders are importable, so the test process can compute the
single-device reference with the very same code.
"""

import json
import os
import pathlib
import re
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

NUM_FEATURES = 8
NUM_CLASSES = 3
GLOBAL_BATCH = 32
LEARNING_RATE = 0.1


def data(num_samples, seed=0):
    """Deterministic inputs and labels (the labels depend on the inputs, so it is learnable)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_samples, NUM_FEATURES)).astype("float32")
    w = rng.normal(size=(NUM_FEATURES, NUM_CLASSES)).astype("float32")
    y = np.argmax(x @ w, axis=1).astype("int32")
    return x, y


def build_model(method, step_size=None, seed=0, batchnorm=False, per_sample=False):
    """Input(8) -> Dense(8) -> ODELayer(Dense(16, tanh) -> Dense(8)) -> Dense(3), compiled
    with plain SGD (no momentum, no randomness). Call under `strategy.scope()` to
    distribute it."""
    import keras

    import tfaca

    keras.utils.set_random_seed(seed)
    hidden = [keras.layers.Dense(16, activation="tanh")]
    if batchnorm:
        hidden.append(keras.layers.BatchNormalization())
    dynamics = keras.Sequential(hidden + [keras.layers.Dense(NUM_FEATURES)])
    model = keras.Sequential(
        [
            keras.Input((NUM_FEATURES,)),
            keras.layers.Dense(NUM_FEATURES),
            tfaca.ODELayer(dynamics, method=method, step_size=step_size, rtol=1e-3, name="ode",
                           per_sample=per_sample),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def save_weights(path, weights):
    np.savez(path, *weights)


def load_weights(path):
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def all_finite(weights):
    return bool(all(np.all(np.isfinite(w)) for w in weights))


def report(result):
    # One line, easy to find among whatever TensorFlow prints.
    print("RESULT " + json.dumps(result), flush=True)


def _fit_one_epoch(model, x, y, batch_size=GLOBAL_BATCH):
    return model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0).history


def mirrored_fixed_step(strategy):
    """One SGD step of a fixed-step (rk4) model: MirroredStrategy vs one device.

    The adaptive solver picks ONE step-size sequence per solve, shared by the whole
    batch (its error norm is the RMS over every element of the batch). Each replica
    solves only its 16 samples, so under dopri5 the replicas take other steps than one
    solve of all 32 samples, and the gradients legitimately differ by about the solver
    tolerance. With rk4 at a fixed step_size the discretization does not depend on the
    batch, so the two updates must agree up to float32 round-off.
    """
    x, y = data(GLOBAL_BATCH)
    single = build_model("rk4", step_size=0.25)
    init = single.get_weights()
    _fit_one_epoch(single, x, y)
    single_after = single.get_weights()

    with strategy.scope():
        mirrored = build_model("rk4", step_size=0.25, seed=1)  # other init, overwritten
    mirrored.set_weights(init)
    init_diff = max_abs_diff(mirrored.get_weights(), init)
    history = _fit_one_epoch(mirrored, x, y)
    after = mirrored.get_weights()
    return {
        "init_diff": init_diff,
        "train_steps": len(history["loss"]),
        "loss": history["loss"][-1],
        "max_diff_vs_single": max_abs_diff(after, single_after),
        "max_update": max_abs_diff(after, init),
        "single_max_update": max_abs_diff(single_after, init),
        "finite": all_finite(after),
        "ode_fevals": history.get("ode_fevals", [None])[-1],
        "ode_steps": history.get("ode_steps", [None])[-1],
    }


def _dopri5_step_vs_single(strategy, **model_kwargs):
    """One SGD step of a dopri5 model (`build_model` options): MirroredStrategy vs one
    device."""
    x, y = data(GLOBAL_BATCH)
    single = build_model("dopri5", **model_kwargs)
    init = single.get_weights()
    _fit_one_epoch(single, x, y)
    single_after = single.get_weights()
    with strategy.scope():
        mirrored = build_model("dopri5", seed=1, **model_kwargs)
    mirrored.set_weights(init)
    _fit_one_epoch(mirrored, x, y)
    after = mirrored.get_weights()
    return {
        "max_diff_vs_single": max_abs_diff(after, single_after),
        "max_update": max_abs_diff(after, init),
        "finite": all_finite(after),
    }


def mirrored_adaptive_step(strategy):
    """One SGD step of a dopri5 model: MirroredStrategy vs one device (close, not equal)."""
    return _dopri5_step_vs_single(strategy)


def mirrored_per_sample_step(strategy):
    """One SGD step of a dopri5 model with per-sample steps: MirroredStrategy vs one
    device. Each sample's steps no longer depend on the samples it is solved with, so
    splitting the batch over replicas changes nothing: the updates agree to float32
    round-off, as with a fixed step (against `adaptive_step`, which differs by about the
    tolerance)."""
    return _dopri5_step_vs_single(strategy, per_sample=True)


def mirrored_adaptive_training(strategy):
    """dopri5 under MirroredStrategy: several epochs of fit lower the loss."""
    x, y = data(4 * GLOBAL_BATCH, seed=1)
    with strategy.scope():
        model = build_model("dopri5")
    before = model.get_weights()
    evaluate = lambda: model.evaluate(  # noqa: E731
        x, y, batch_size=GLOBAL_BATCH, verbose=0, return_dict=True
    )["loss"]
    initial_loss = evaluate()
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=4, shuffle=False, verbose=0)
    after = model.get_weights()
    return {
        "epochs": len(history.history["loss"]),
        "loss_history": history.history["loss"],
        "initial_loss": initial_loss,
        "final_loss": evaluate(),
        "max_update": max_abs_diff(after, before),
        "finite": all_finite(after),
        "ode_fevals": history.history.get("ode_fevals", [None])[-1],
    }


def mirrored_batchnorm(strategy):
    """BatchNormalization inside the dynamics, rk4, one step under MirroredStrategy.

    Replica r computes batch statistics on its own half of the batch and keeps its own
    copy of the moving statistics (Keras' default, non-synchronized BatchNorm). Since
    ACA updates the moving statistics in the backward replay, before the optimizer
    changes any weight, replica r's moving statistics after the step must equal those of
    a single-device step on half r; and as the SGD update is linear in the all-reduced
    gradient, the trainable weights must equal the mean of the two single-device
    half-batch results.
    """

    half = GLOBAL_BATCH // 2
    x, y = data(GLOBAL_BATCH, seed=3)
    reference = build_model("rk4", step_size=0.25, batchnorm=True)
    init = reference.get_weights()
    halves = []
    for r in range(2):
        model = build_model("rk4", step_size=0.25, batchnorm=True, seed=1)
        model.set_weights(init)
        _fit_one_epoch(model, x[r * half:(r + 1) * half], y[r * half:(r + 1) * half], half)
        halves.append(model)

    with strategy.scope():
        mirrored = build_model("rk4", step_size=0.25, batchnorm=True, seed=1)
    mirrored.set_weights(init)
    _fit_one_epoch(mirrored, x, y)

    trainable = [v.numpy() for v in mirrored.trainable_weights]
    mean_of_halves = [
        (a.numpy() + b.numpy()) / 2
        for a, b in zip(halves[0].trainable_weights, halves[1].trainable_weights)
    ]
    init_trainable = [init[i] for i, v in enumerate(mirrored.weights) if v.trainable]
    stats = {}
    for name in ("moving_mean", "moving_variance"):
        (var,) = [v for v in mirrored.non_trainable_weights if v.name == name]
        (index,) = [i for i, v in enumerate(mirrored.weights) if v is var]
        per_replica = [t.numpy() for t in strategy.experimental_local_results(var.value)]
        stats[name] = {
            "num_copies": len(per_replica),
            "max_diff_vs_half": [
                float(np.max(np.abs(per_replica[r] - halves[r].weights[index].numpy())))
                for r in range(2)
            ],
            "max_change": [float(np.max(np.abs(c - init[index]))) for c in per_replica],
        }
    return {
        "max_diff_vs_mean_of_halves": max_abs_diff(trainable, mean_of_halves),
        "max_update": max_abs_diff(trainable, init_trainable),
        "stats": stats,
        "finite": all_finite(mirrored.get_weights()),
    }


def mirrored_partial_batch(strategy):
    """33 samples at a global batch of 32: the last global batch holds ONE sample, so
    tf.distribute hands one replica an EMPTY batch (0 rows). A data-parallel layer must
    cope with that: Dense does; an ODE solve of an empty state should return it."""
    x, y = data(GLOBAL_BATCH + 1, seed=4)
    out = {}
    for method, step_size in (("rk4", 0.25), ("dopri5", None)):
        with strategy.scope():
            model = build_model(method, step_size=step_size)
        try:
            history = _fit_one_epoch(model, x, y)
            predictions = model.predict(x, batch_size=GLOBAL_BATCH, verbose=0)
            out[method] = {
                "error": None,
                "loss": history["loss"][-1],
                "finite": all_finite(model.get_weights()) and bool(np.isfinite(predictions).all()),
                "predictions_shape": list(predictions.shape),
            }
        except Exception as e:  # reported to the test, which shows it
            out[method] = {"error": f"{type(e).__name__}: {_brief(e)}"}
    return out


def mirrored_empty_replica_batches(strategy):
    """5 samples at a global batch of 4: the second global batch holds one sample, so one
    replica gets an empty batch, with per-sample steps and with times per sample (a
    `[state, times]` input whose rows end at different times, one of them all padding).
    fit and predict must run and stay finite."""
    import keras

    import tfaca

    x, y = data(5, seed=5)
    times = np.array([[0.0, 0.5, 1.0], [0.0, 0.7, 0.7], [0.0, 0.3, 1.2], [0.0, 0.0, 0.0],
                      [0.0, 1.0, 1.0]], "float32")

    def with_times():
        keras.utils.set_random_seed(0)
        state = keras.Input((NUM_FEATURES,))
        ts = keras.Input((3,))
        dynamics = keras.Sequential([keras.layers.Dense(16, activation="tanh"),
                                     keras.layers.Dense(NUM_FEATURES)])
        h = tfaca.ODELayer(dynamics, name="ode")([keras.layers.Dense(NUM_FEATURES)(state), ts])
        model = keras.Model([state, ts], keras.layers.Dense(NUM_CLASSES)(h))
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    out = {}
    for name, build, inputs in (("per_sample", lambda: build_model("dopri5", per_sample=True), x),
                                ("times_per_sample", with_times, [x, times])):
        with strategy.scope():
            model = build()
        try:
            history = model.fit(inputs, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
            predictions = model.predict(inputs, batch_size=4, verbose=0)
            out[name] = {
                "error": None,
                "loss": history.history["loss"][-1],
                "finite": all_finite(model.get_weights()) and bool(np.isfinite(predictions).all()),
                "predictions_shape": list(predictions.shape),
            }
        except Exception as e:  # reported to the test, which shows it
            out[name] = {"error": f"{type(e).__name__}: {_brief(e)}"}
    return out


def series_data(num_samples, n=6, channels=2, seed=0):
    """Irregular series: times `(num_samples, n)` per series from 0, values, labels."""
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0.05, 2.0, (num_samples, n)), axis=1).astype("float32")
    times[:, 0] = 0.0
    values = rng.normal(size=(num_samples, n, channels)).astype("float32")
    labels = (values[:, :, 0].mean(axis=1) > 0).astype("int32")
    return [times, values], labels


def build_series_model(seed=0, n=6, channels=2):
    """A neural CDE, an ODE driven by the series and an ODE-RNN side by side, each at a
    fixed RK4 step with per-sample steps (so a replica's half batch takes the steps the
    whole batch takes), into one SGD classifier."""
    import keras

    import tfaca

    keras.utils.set_random_seed(seed)
    fixed = dict(method="rk4", step_size=0.25, per_sample=True)
    times, values = keras.Input((n,)), keras.Input((n, channels))
    field = keras.Sequential([keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(4 * (channels + 1), activation="tanh")])
    cde = tfaca.CDELayer(field, 4, **fixed)([times, values])
    first = keras.layers.Flatten()(keras.layers.Cropping1D((0, n - 1))(values))
    dynamics = keras.Sequential([keras.layers.Dense(8, activation="tanh"),
                                 keras.layers.Dense(3)])
    driven = tfaca.ODELayer(dynamics, control="linear", **fixed)(
        [keras.layers.Dense(3)(first), times, values])
    steps = keras.layers.Concatenate()([keras.layers.Reshape((n, 1))(times), values])
    rnn = keras.layers.RNN(tfaca.ODERNNCell(4, **fixed))(steps)
    logits = keras.layers.Dense(NUM_CLASSES)(keras.layers.Concatenate()([cde, driven, rnn]))
    model = keras.Model([times, values], logits)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def mirrored_series_layers(strategy):
    """One SGD step of the series layers (`build_series_model`): MirroredStrategy vs one
    device, equal to float32 round-off."""
    x, y = series_data(GLOBAL_BATCH)
    single = build_series_model()
    init = single.get_weights()
    _fit_one_epoch(single, x, y)
    single_after = single.get_weights()
    with strategy.scope():
        mirrored = build_series_model(seed=1)
    mirrored.set_weights(init)
    history = _fit_one_epoch(mirrored, x, y)
    after = mirrored.get_weights()
    return {
        "loss": history["loss"][-1],
        "max_diff_vs_single": max_abs_diff(after, single_after),
        "max_update": max_abs_diff(after, init),
        "finite": all_finite(after),
    }


def _brief(error):
    """The root errors of a TensorFlow error, without the traceback of the node."""
    text = getattr(error, "message", None) or str(error)
    roots = [line.strip() for line in text.splitlines() if re.match(r"\s*\(\d+\) [A-Z_]+:", line)]
    return ("; ".join(roots) if roots else text)[:2000]


MIRRORED_SCENARIOS = {
    "fixed_step": mirrored_fixed_step,
    "adaptive_step": mirrored_adaptive_step,
    "per_sample_step": mirrored_per_sample_step,
    "adaptive_training": mirrored_adaptive_training,
    "batchnorm": mirrored_batchnorm,
    "partial_batch": mirrored_partial_batch,
    "empty_replica_batches": mirrored_empty_replica_batches,
    "series_layers": mirrored_series_layers,
}


def run_mirrored(names=None):
    import tensorflow as tf

    # Two logical CPU devices; must happen before anything initializes the devices.
    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    result = {"devices": devices, "num_replicas": strategy.num_replicas_in_sync}
    # Each scenario reports on its own: one failing does not hide the others.
    for name in names or MIRRORED_SCENARIOS:
        try:
            result[name] = MIRRORED_SCENARIOS[name](strategy)
        except Exception as e:
            import traceback

            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {_brief(e)}"}
    report(result)


def train_custom_loop(strategy, model, x, y, epochs):
    """Synchronous data-parallel SGD with `strategy.run`, using public APIs only.

    Keras 3's `fit` cannot be used under a multi-worker `MultiWorkerMirroredStrategy`:
    before training it reduces the first distributed batch eagerly
    (`TensorFlowTrainer._maybe_symbolic_build`), which fails with "Attempt to convert a
    value (PerReplica...) to a Tensor" for any model, with or without tfaca
    (keras-team/keras#20585). The loop below is the standard custom training loop of
    the TF distribution guide.

    Each global batch is the same GLOBAL_BATCH rows as in a single-device run: input
    pipeline `i` of `n` takes rows `[i * per_replica, (i + 1) * per_replica)` of it.
    """
    import keras
    import tensorflow as tf

    num_replicas = strategy.num_replicas_in_sync
    per_replica = GLOBAL_BATCH // num_replicas

    def dataset_fn(context):
        # One replica per input pipeline (one CPU per worker, or no strategy at all).
        assert context.num_input_pipelines == num_replicas, context
        i = context.input_pipeline_id
        batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
        rows = slice(i * per_replica, (i + 1) * per_replica)
        return batches.map(lambda a, b: (a[rows], b[rows]))

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    optimizer = model.optimizer
    variables = model.trainable_variables

    @tf.function
    def train_step(inputs):
        def step_fn(xb, yb):
            with tf.GradientTape() as tape:
                logits = model(xb, training=True)
                per_example = keras.losses.sparse_categorical_crossentropy(
                    yb, logits, from_logits=True
                )
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, variables)
            optimizer.apply_gradients(zip(grads, variables))
            return loss

        per_replica_loss = strategy.run(step_fn, args=inputs)
        return strategy.reduce("SUM", per_replica_loss, axis=None)

    losses = []
    for _ in range(epochs):
        for inputs in dataset:
            losses.append(float(train_step(inputs)))
    return losses


def run_multiworker(out_dir, init_path):
    import tensorflow as tf

    # The strategy must be created first: it starts this worker's gRPC server.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    index = task["index"]
    result = {"index": index, "num_replicas": strategy.num_replicas_in_sync}
    init = load_weights(init_path)
    x, y = multiworker_data()

    # Fixed-step rk4: the result must equal the single-device run (see
    # mirrored_fixed_step for why not dopri5).
    with strategy.scope():
        model = build_model("rk4", step_size=0.25)
    model.set_weights(init)
    result["rk4_loss"] = train_custom_loop(strategy, model, x, y, epochs=1)
    save_weights(os.path.join(out_dir, f"worker{index}_rk4.npz"), model.get_weights())

    # Adaptive dopri5: each worker's solve takes its own steps, but the all-reduced
    # gradients keep the workers' weights identical.
    with strategy.scope():
        model = build_model("dopri5")
    model.set_weights(init)
    result["dopri5_loss"] = train_custom_loop(strategy, model, x, y, epochs=2)
    save_weights(os.path.join(out_dir, f"worker{index}_dopri5.npz"), model.get_weights())
    report(result)


def multiworker_data():
    return data(4 * GLOBAL_BATCH, seed=2)


def main(argv):
    mode = argv[0]
    if mode == "mirrored":
        run_mirrored(argv[1].split(",") if len(argv) > 1 else None)
    elif mode == "multiworker":
        out_dir, init_path = argv[1], argv[2]
        pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
        run_multiworker(out_dir, init_path)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

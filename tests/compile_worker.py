"""Subprocess helper for tests/test_jit.py: solves whose number of accepted steps drifts
from call to call, with the solver's loops compiled with XLA (`jit_compile=True`).

    python compile_worker.py CONFIG[,CONFIG...] [--calls N]

For each configuration, in order, it calls one function (a `tf.function`, or eagerly
for the `eager` ones) N times (default 4) on a state scaled so that the solver takes
another number of steps each time, and writes `@@ CONFIG` to stderr before each call,
where the test's `helpers.count_xla_compilations` splits TensorFlow's log. Prints, as
its last line, a JSON object: each configuration's steps per call (the most any sample
took).
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfaca  # noqa: E402

BATCH, STATE = 8, 4
keras.utils.set_random_seed(0)
SCALES = [1.0, 3.0, 0.5, 8.0, 2.0, 13.0]
W = tf.Variable(np.random.default_rng(1).normal(size=(STATE, STATE)).astype("float32"))
# Each sample's own times, [batch, 6]: from 0, increasing.
TIMES = np.concatenate([np.zeros((BATCH, 1)), np.sort(
    np.random.default_rng(0).uniform(0.1, 1.0, (BATCH, 5)), axis=1)], axis=1).astype("float32")


def field(t, y):
    return tf.tanh(y @ W)


def _options(config):
    """`tfaca.solve`'s options and output times of a configuration."""
    two, many, stepped = [0.0, 1.0], np.linspace(0.0, 1.0, 12), np.linspace(0.0, 1.0, 4)
    return {
        "two_times": (dict(), two),
        "dense": (dict(), many),
        "stepped": (dict(interpolate=False), stepped),
        "per_sample": (dict(per_sample=True), two),
        "per_sample_dense": (dict(per_sample=True), many),
        "times_per_sample": (dict(), TIMES),
        "per_sample_times": (dict(per_sample=True), TIMES),
        "budget": (dict(gradient=tfaca.ACAGradient(checkpoints=4), interpolate=False), stepped),
        "mali": (dict(method="alf", gradient="mali", interpolate=False), stepped),
        "adjoint": (dict(gradient="adjoint"), two),
        "adjoint_per_sample": (dict(gradient="adjoint", per_sample=True), two),
        # Times that change with every call: the reverse solve sorts them.
        "adjoint_times_per_sample": (dict(gradient="adjoint"), TIMES),
        "eager": (dict(), many),
    }[config]


def solve_function(config):
    """`run(y0) -> steps` of a configuration: a solve and its gradient."""
    if config == "eager_layer":
        dynamics = keras.Sequential([keras.layers.Dense(8, activation="tanh"),
                                     keras.layers.Dense(STATE)])
        layer = tfaca.ODELayer(dynamics, t=(0.0, 0.5, 1.0), rtol=1e-5, jit_compile=True)

        def run_layer(y0):
            layer.steps_tracker.reset_state()
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(y0) ** 2)
            tape.gradient(loss, layer.trainable_variables)
            return layer.steps_tracker.result()

        return run_layer

    options, ts = _options(config)
    ts = tf.constant(ts, tf.float32)

    def run(y0):
        times = ts * (1.0 + 0.1 * tf.tanh(tf.reduce_mean(y0))) if "adjoint_times" in config else ts
        with tf.GradientTape() as tape:
            tape.watch(y0)
            sol = tfaca.solve(field, y0, times, rtol=1e-5, jit_compile=True, **options)
            loss = tf.reduce_sum(sol.ys[-1] ** 2)
        tape.gradient(loss, [W, y0])
        return tf.reduce_max(sol.stats.num_steps)

    return run if config.startswith("eager") else tf.function(run)


def main(argv):
    configs = argv[0].split(",")
    calls = int(argv[argv.index("--calls") + 1]) if "--calls" in argv else 4
    y0 = np.random.default_rng(2).normal(size=(BATCH, STATE)).astype("float32")
    steps = {}
    for config in configs:
        run = solve_function(config)
        steps[config] = []
        for scale in SCALES[:calls]:
            print(f"@@ {config}", file=sys.stderr, flush=True)
            steps[config].append(float(run(tf.constant(y0 * scale))))
    print(json.dumps(steps))


if __name__ == "__main__":
    main(sys.argv[1:])

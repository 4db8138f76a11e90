"""A `model.fit` epoch of a small ODELayer model in the modes a Keras user meets.

    python benchmarks/keras_fit.py [--quick] [--out benchmarks/keras_fit.md]

The model: state 8, dynamics Dense(32, tanh) -> Dense(8), ODELayer (Dopri5, default
tolerances, ACA) between Dense layers, batch 64, 2,048 samples (32 steps per epoch),
float32, Adam. Modes:

- Keras' default compile (`jit_compile="auto"`, which is off on a CPU), the layer's
  default `jit_compile="auto"` (the solver's loops compiled with XLA): what a user gets;
- the same with `ODELayer(jit_compile=False)` (every op through TensorFlow's executor,
  tfaca before issue 12);
- `model.compile(jit_compile=True)`: the whole train step compiled;
- under `tf.distribute.MirroredStrategy` on two logical CPU devices (where Keras never
  compiles), with the layer's default (which compiles the solver's loops there too) and with
  `jit_compile=True` and `False`;
- `drift`: Keras' default, with the step count drifting from batch to batch, as with
  irregularly sampled data: the model also takes the times, and each batch is solved to
  another end time (1 to 6, cycling), 3 to 7 accepted steps. A compiled loop whose inputs
  followed the step count would compile again for each new count (0.5-4 s each, tfaca
  before issue 25): in the first epoch, and in a later one when training brings a new
  count (the slowest epoch after the first).

Each mode trains a fresh model with the same initial weights in a child process of its
own (XLA's compile caches and TensorFlow's device set are per process); an epoch is timed
from its first batch to its end, the epoch time is the median of the epochs after the
first (which traces and compiles, reported apart), and the slowest of them is reported
too. Writes a markdown table to `--out` and prints it.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODES = {
    "default": "Keras default compile, ODELayer default (`jit_compile=\"auto\"`)",
    "nojit": "Keras default compile, `ODELayer(jit_compile=False)`",
    "xla": "`model.compile(jit_compile=True)`",
    "mirrored": "MirroredStrategy, 2 logical CPUs, ODELayer default",
    "mirrored_jit": "MirroredStrategy, 2 logical CPUs, `ODELayer(jit_compile=True)`",
    "mirrored_nojit": "MirroredStrategy, 2 logical CPUs, `ODELayer(jit_compile=False)`",
    "drift": "Keras default compile, ODELayer default, steps drifting between batches",
}
# The end time of each batch in the `drift` mode, cycling.
DRIFT_END_TIMES = [1.0, 2.0, 4.0, 6.0, 3.0]


def child(mode, epochs, samples):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    if mode.startswith("mirrored"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    import tfaca

    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 8)).astype("float32")
    y = np.sin(x[:, :1] + x[:, 1:2])
    jit = False if mode.endswith("nojit") else True if mode.endswith("_jit") else "auto"
    drift = mode == "drift"
    if drift:
        batches = np.arange(samples) // 64
        ends = np.asarray(DRIFT_END_TIMES, "float32")[batches % len(DRIFT_END_TIMES)]
        x = [x, np.stack([np.zeros_like(ends), ends], axis=1)]

    def build():
        keras.utils.set_random_seed(0)
        dynamics = keras.Sequential([keras.layers.Dense(32, activation="tanh"),
                                     keras.layers.Dense(8)])
        ode = tfaca.ODELayer(dynamics, jit_compile=jit)
        if drift:
            state, times = keras.Input((8,)), keras.Input((2,))
            out = keras.layers.Dense(1)(ode([keras.layers.Dense(8)(state), times]))
            model = keras.Model([state, times], out)
        else:
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8), ode,
                                      keras.layers.Dense(1)])
        model.compile(keras.optimizers.Adam(1e-3), "mse",
                      jit_compile=True if mode == "xla" else "auto")
        return model, ode

    if mode.startswith("mirrored"):
        with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
            model, ode = build()
    else:
        model, ode = build()
    seconds, batch_steps, running = [], [], [0.0]

    def batch_end(batch, logs):
        # The logged steps are the epoch's running mean: a batch's own is the difference
        # of the running totals.
        total = float(logs[f"{ode.name}_steps"]) * (batch + 1)
        batch_steps.append(round(total - (running[0] if batch else 0.0)))
        running[0] = total

    def batch_begin(batch, logs):
        # From the epoch's first batch: Keras makes the epoch's data iterator before it,
        # which took up to seconds at the second epoch on a loaded machine.
        if batch == 0:
            seconds.append(-time.perf_counter())

    clock = keras.callbacks.LambdaCallback(
        on_train_batch_begin=batch_begin, on_train_batch_end=batch_end,
        on_epoch_end=lambda e, logs: seconds.__setitem__(-1, seconds[-1] + time.perf_counter()))
    history = model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, callbacks=[clock],
                        shuffle=False)
    print(json.dumps(dict(mode=mode, first=seconds[0], epoch=statistics.median(seconds[1:]),
                          epochs=seconds, loss=history.history["loss"][-1],
                          steps=history.history[f"{ode.name}_steps"][-1],
                          batch_steps=[min(batch_steps), max(batch_steps)])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs of 512 samples")
    parser.add_argument("--out", default=os.path.join(HERE, "keras_fit.md"))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    epochs, samples = (3, 512) if args.quick else (6, 2048)
    if args.child:
        child(args.child, epochs, samples)
        return None
    results = {}
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"--modes must name some of {', '.join(MODES)}. Received: {mode!r}")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        argv_child = [sys.executable, os.path.abspath(__file__), "--child", mode]
        proc = subprocess.run(argv_child + (["--quick"] if args.quick else []), env=env,
                              capture_output=True, text=True, check=False)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not lines:
            raise RuntimeError(f"mode {mode} failed: {proc.stderr.strip()[-2000:]}")
        results[mode] = json.loads(lines[-1])
        r = results[mode]
        print(f"{mode}: {r['epoch'] * 1e3:.0f} ms/epoch (first {r['first']:.1f} s, epochs "
              f"{', '.join(f'{e:.2f}' for e in r['epochs'])} s), loss {r['loss']:.4f}",
              flush=True)
    base = results.get("xla")
    rows = ["| mode | ms per epoch | × `jit_compile=True` | first epoch s (trace, compile) | "
            "slowest later epoch ms | steps per batch | loss after the last epoch |",
            "|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        ratio = f"{r['epoch'] / base['epoch']:.2f}" if base else "n/a"
        low, high = r["batch_steps"]
        rows.append(f"| {MODES[mode]} | {r['epoch'] * 1e3:.0f} | {ratio} | {r['first']:.1f} | "
                    f"{max(r['epochs'][1:]) * 1e3:.0f} | {low}-{high} | {r['loss']:.4f} |")
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = (f"# `model.fit` epoch of a small ODELayer model\n\nGenerated by `python "
            f"benchmarks/keras_fit.py{' --quick' if args.quick else ''}` on {when} "
            f"({samples} samples, batch 64, {epochs} epochs, each mode in a process of its "
            "own; an epoch timed from its first batch; median epoch after the first). State 8, dynamics Dense(32, tanh) -> "
            "Dense(8), Dopri5 at the default tolerances, ACA, float32, CPU."
            + (" The drift mode's batches end at times "
               f"{', '.join(f'{t:g}' for t in DRIFT_END_TIMES)}, cycling; a recompile for a "
               "new step count would show in its slowest epoch after the first."
               if "drift" in results else "")
            + "\n\n" + "\n".join(rows) + "\n")
    with open(args.out, "w") as fh:
        fh.write(text)
    print()
    print(text)
    return results


if __name__ == "__main__":
    main()

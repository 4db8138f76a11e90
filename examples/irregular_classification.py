"""Classifying irregular, partially observed multivariate series: a neural CDE, an ODE-RNN,
a GRU fed the time gaps and a GRU-D-style network, as in Kidger et al. (NeurIPS 2020),
Table 1 (CharacterTrajectories with 30 / 50 / 70 % of the data dropped).

    python examples/irregular_classification.py [--quick] [--missing 0.3,0.5,0.7]
        [--epochs 12] [--train 400] [--uea DIR] [--models cde,odernn,gru_dt,grud]
        [--out-dir results/irregular_classification]

Data (generated, seeded, no download): pen-like trajectories of 8 classes, 3 channels
(x, y, pressure) on 60 regular times in [0, 1]: each class is a pair of frequencies
of a smooth curve, drawn with a random phase, amplitude, speed and noise. Then a
fraction `missing` of the values is dropped independently per value; a time where every
channel is missing is dropped altogether, so each series has its own irregular times
(padded at the end by repeating its last time, as tfaca's layers expect). With `--uea
DIR`, the UEA archive's CharacterTrajectories (`CharacterTrajectories_TRAIN.ts` and
`_TEST.ts`, sktime's `.ts` format, from timeseriesclassification.com) is used instead,
with the same dropping.

Models (hidden size 32, Adam 3e-3, batch 32, the same seed):
- neural CDE: `tfaca.CDELayer` on a natural cubic spline of (time, values) with its
  missing values filled from the last observation (Kidger et al.'s setup);
- ODE-RNN: `keras.layers.RNN(tfaca.ODERNNCell)` over (time, values, mask);
- GRU-dt: a GRU over (values filled, mask, time since the previous observation);
- GRU-D: a GRU whose input decays from the last observation to the training mean and
  whose hidden state decays with the time since the previous observation (Che et al.,
  2018), as a small Keras cell.

Reported per missing rate: test accuracy, seconds per epoch, peak memory of training
(resident set, MiB), and for the ODE models the solver's steps per solve. Written to
`--out-dir` (with `--quick`, `results/quick/irregular_classification`, ignored by git):
`results.md`, `results.csv`, `accuracy.png`. `main(argv)` returns the rows.

`--quick` (the slow tests run it): 30 % missing, 128 series, 2 epochs.
"""

import argparse
import csv
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _memory  # noqa: E402

import tfaca  # noqa: E402

HIDDEN = 32
CLASSES, CHANNELS, LENGTH = 8, 3, 60
MODELS = ("cde", "odernn", "gru_dt", "grud")
NAMES = {"cde": "neural CDE", "odernn": "ODE-RNN", "gru_dt": "GRU-dt", "grud": "GRU-D"}
FULL = dict(missing=(0.3, 0.5, 0.7), train=400, test=200, epochs=12, batch=32)
QUICK = dict(missing=(0.3,), train=128, test=64, epochs=2, batch=32)


# ----------------------------------------------------------------------------- data

def trajectories(n, rng):
    """`n` generated series `(n, LENGTH, CHANNELS)` on times `[0, 1]`, and their labels."""
    labels = rng.integers(0, CLASSES, n)
    fx = np.array([1, 1, 2, 2, 3, 1, 3, 2])[labels][:, None]
    fy = np.array([1, 2, 1, 3, 2, 3, 1, 2])[labels][:, None]
    grid = np.linspace(0.0, 1.0, LENGTH)[None]
    speed = rng.uniform(0.85, 1.15, (n, 1))
    s = 2 * np.pi * grid * speed
    phase = rng.uniform(0, 0.5, (n, 1))
    amp = rng.uniform(0.7, 1.3, (n, 2))
    x = amp[:, :1] * np.sin(fx * s + phase)
    y = amp[:, 1:] * np.sin(fy * s + 2 * phase)
    pressure = np.cos(fx * fy * s / 2) * 0.5
    values = np.stack([x, y, pressure], axis=-1) + rng.normal(0, 0.08, (n, LENGTH, 3))
    return np.broadcast_to(grid, (n, LENGTH)).copy(), values, labels


def read_ts(path):
    """A UEA `.ts` file (sktime's format): `(times, values, labels)`, every series on
    times `[0, 1]` at its own length, padded to the longest; labels as integers in the
    order of the `@classLabel` header."""
    classes, series, labels = None, [], []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.lower().startswith("@classlabel"):
                classes = line.split()[2:]
                continue
            if line.startswith("@"):
                continue
            *dims, label = line.split(":")
            channels = [np.array([float(v) if v != "?" else np.nan for v in d.split(",")])
                        for d in dims]
            series.append(np.stack(channels, axis=-1))
            labels.append(label)
    length = max(len(s) for s in series)
    times = np.zeros((len(series), length))
    values = np.zeros((len(series), length, series[0].shape[-1]))
    for i, s in enumerate(series):
        k = len(s)
        times[i, :k] = np.linspace(0.0, 1.0, k)
        times[i, k:] = 1.0
        values[i, :k] = s
        values[i, k:] = s[-1]
    order = classes or sorted(set(labels))
    return times, values, np.array([order.index(label) for label in labels])


def drop(times, values, missing, rng):
    """Drops a fraction `missing` of the values (NaN), and the times where all are gone:
    each series keeps its observed times first, padded by repeating its last one.
    Returns `(times, values with NaN, mask)`, float32."""
    n, length, channels = values.shape
    values = values.copy()
    # Padding already there (UEA series of other lengths) stays padding.
    real = np.concatenate([np.ones((n, 1), bool), np.diff(times, axis=1) > 0], axis=1)
    lost = rng.uniform(size=values.shape) < missing
    lost[:, 0] = False  # every series keeps its first observation (the path's start)
    values[lost] = np.nan
    keep = real & ~np.all(lost, axis=2)
    out_t = np.zeros_like(times)
    out_v = np.zeros_like(values)
    for i in range(n):
        idx = np.flatnonzero(keep[i])
        k = len(idx)
        out_t[i, :k], out_v[i, :k] = times[i, idx], values[i, idx]
        out_t[i, k:], out_v[i, k:] = out_t[i, k - 1], out_v[i, k - 1]
    mask = np.isfinite(out_v)
    return out_t.astype("float32"), out_v.astype("float32"), mask


def features(times, values, mask, train_mean):
    """The recurrent baselines' inputs `(n, length, ...)`: values filled from the last
    observation (the training mean before the first), the mask, the time since the
    previous observation; and the padding mask `(n, length)`."""
    n, length, _ = values.shape
    filled = values.copy()
    for k in range(length):
        prev = filled[:, k - 1] if k else np.broadcast_to(train_mean, filled[:, 0].shape)
        filled[:, k] = np.where(mask[:, k], values[:, k], prev)
    gaps = np.diff(times, axis=1, prepend=times[:, :1])
    padding = np.concatenate([np.ones((n, 1), bool), np.diff(times, axis=1) > 0], axis=1)
    return filled, mask.astype("float32"), gaps[..., None].astype("float32"), padding


# ----------------------------------------------------------------------------- models

def classifier(inputs, hidden, name):
    logits = keras.layers.Dense(CLASSES)(hidden)
    model = keras.Model(inputs, logits, name=name)
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def neural_cde(length):
    times, values = keras.Input((length,)), keras.Input((length, CHANNELS))
    field = keras.Sequential([keras.layers.Dense(64, activation="softplus"),
                              keras.layers.Dense(HIDDEN * (CHANNELS + 1), activation="tanh")])
    z = tfaca.CDELayer(field, HIDDEN, path="cubic", name="ode")([times, values])
    return classifier([times, values], z, "neural_cde")


def ode_rnn(length):
    steps, padding = keras.Input((length, 1 + 2 * CHANNELS)), keras.Input((length,), dtype="bool")
    h = keras.layers.RNN(tfaca.ODERNNCell(HIDDEN, name="ode"))(steps, mask=padding)
    return classifier([steps, padding], h, "ode_rnn")


def gru_dt(length):
    steps, padding = keras.Input((length, 2 * CHANNELS + 1)), keras.Input((length,), dtype="bool")
    h = keras.layers.GRU(HIDDEN)(steps, mask=padding)
    return classifier([steps, padding], h, "gru_dt")


@keras.saving.register_keras_serializable(package="examples")
class GRUDCell(keras.layers.Layer):
    """GRU-D (Che et al., 2018): the input decays from its last observation to the
    training mean, the hidden state decays, both with the time since the last
    observation; then a GRU step on (decayed input, mask). Step inputs: last observed
    values, mask, time gap (`CHANNELS`, `CHANNELS`, 1)."""

    def __init__(self, units, mean, **kwargs):
        super().__init__(**kwargs)
        self.units, self.mean = units, [float(m) for m in mean]
        self.gru = keras.layers.GRUCell(units)
        self.input_decay = keras.layers.Dense(CHANNELS, activation="relu")
        self.hidden_decay = keras.layers.Dense(units, activation="relu")
        self.state_size = units
        self.output_size = units

    def build(self, input_shape):
        self.input_decay.build((None, 1))
        self.hidden_decay.build((None, 1))
        self.gru.build((None, 2 * CHANNELS))
        self.built = True

    def call(self, inputs, states, training=None):
        last, mask, gap = (inputs[:, :CHANNELS], inputs[:, CHANNELS:2 * CHANNELS],
                           inputs[:, -1:])
        gamma_x = tf.exp(-self.input_decay(gap))
        x = mask * last + (1 - mask) * (gamma_x * last + (1 - gamma_x) * tf.constant(self.mean))
        h = tf.exp(-self.hidden_decay(gap)) * states[0]
        h, _ = self.gru(tf.concat([x, mask], axis=1), [h], training=training)
        return h, [h]

    def get_config(self):
        return {**super().get_config(), "units": self.units, "mean": self.mean}


def grud(length, mean):
    steps, padding = keras.Input((length, 2 * CHANNELS + 1)), keras.Input((length,), dtype="bool")
    h = keras.layers.RNN(GRUDCell(HIDDEN, mean))(steps, mask=padding)
    return classifier([steps, padding], h, "grud")


def model_inputs(name, times, values, mask, train_mean):
    """Each model's inputs for series `(times, values with NaN, mask)`."""
    if name == "cde":
        return [times, values]
    filled, m, gaps, padding = features(times, values, mask, train_mean)
    if name == "odernn":
        return [np.concatenate([times[..., None], filled, m], axis=-1), padding]
    return [np.concatenate([filled, m, gaps], axis=-1), padding]


def build(name, length, train_mean):
    if name == "grud":
        return grud(length, train_mean)
    return {"cde": neural_cde, "odernn": ode_rnn, "gru_dt": gru_dt}[name](length)


# ----------------------------------------------------------------------------- running

def run_one(name, train, test, train_mean, epochs, batch, verbose):
    keras.utils.set_random_seed(0)
    length = train[0].shape[1]
    model = build(name, length, train_mean)
    x_train, x_test = (model_inputs(name, *data[:3], train_mean) for data in (train, test))
    start_kb = _memory.reset_peak_kb()
    start = time.perf_counter()
    history = model.fit(x_train, train[3], batch_size=batch, epochs=epochs,
                        verbose=2 if verbose else 0)
    seconds = time.perf_counter() - start
    peak_mib = (_memory.peak_kb() - start_kb) / 1024
    scores = model.evaluate(x_test, test[3], batch_size=256, verbose=0, return_dict=True)
    row = {"model": NAMES[name], "test accuracy": round(float(scores["accuracy"]), 4),
           "s/epoch": round(seconds / epochs, 2), "peak MiB": round(peak_mib, 1)}
    steps = [k for k in history.history if k.endswith("_steps")]
    if steps:
        row["steps/solve"] = round(float(history.history[steps[0]][-1]), 1)
    return row


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--missing", help="comma-separated fractions, e.g. 0.3,0.5,0.7")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--train", type=int, help="training series (generated data)")
    parser.add_argument("--uea", help="directory holding CharacterTrajectories_TRAIN.ts/_TEST.ts")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out-dir")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    config = dict(QUICK if args.quick else FULL)
    if args.missing:
        config["missing"] = tuple(float(m) for m in args.missing.split(","))
    if args.epochs:
        config["epochs"] = args.epochs
    if args.train:
        config["train"] = args.train
    models = args.models.split(",")
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"--models must name some of {', '.join(MODELS)}; received {args.models}")
    args.out_dir = args.out_dir or (
        "results/quick/irregular_classification" if args.quick
        else "results/irregular_classification")
    return args, config, models


def load(config, args):
    """Full series `(times, values, labels)` for training and testing."""
    if args.uea:
        train = read_ts(os.path.join(args.uea, "CharacterTrajectories_TRAIN.ts"))
        test = read_ts(os.path.join(args.uea, "CharacterTrajectories_TEST.ts"))
        return train, test, "UEA CharacterTrajectories"
    rng = np.random.default_rng(0)
    return (trajectories(config["train"], rng), trajectories(config["test"], rng),
            "generated trajectories")


def write_results(out, rows, source, config):
    os.makedirs(out, exist_ok=True)
    keys = ["missing", "model", "test accuracy", "s/epoch", "peak MiB", "steps/solve"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Irregular classification ({source})\n\n"
                f"{config['train']} training and {config['test']} test series (generated "
                f"data; the UEA split otherwise), {config['epochs']} epochs, batch "
                f"{config['batch']}, hidden size {HIDDEN}; "
                f"`python examples/irregular_classification.py` on {os.cpu_count()} CPU "
                f"cores, TensorFlow {tf.__version__}.\n\n")
        f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for row in rows:
            f.write("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |\n")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in NAMES.values():
        points = [(r["missing"], r["test accuracy"]) for r in rows if r["model"] == name]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xlabel("fraction of values dropped")
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    args, config, models = parse_args(argv)
    out = args.out_dir
    (train_t, train_v, train_y), (test_t, test_v, test_y), source = load(config, args)
    config["train"], config["test"] = len(train_y), len(test_y)
    rows = []
    for missing in config["missing"]:
        rng = np.random.default_rng(int(missing * 100))
        train = (*drop(train_t, train_v, missing, rng), train_y)
        test = (*drop(test_t, test_v, missing, rng), test_y)
        train_mean = np.nanmean(train[1], axis=(0, 1)).astype("float32")
        print(f"=== {missing:.0%} of the values dropped ({source}): "
              f"{(np.diff(train[0], axis=1) > 0).sum(axis=1).mean() + 1:.1f} observed times "
              "per series", 
              flush=True)
        for name in models:
            row = {"missing": missing, **run_one(name, train, test, train_mean,
                                                 config["epochs"], config["batch"],
                                                 not args.quiet)}
            rows.append(row)
            print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    write_results(out, rows, source, config)
    print(f"wrote {out}/results.md, results.csv, accuracy.png")
    return rows


if __name__ == "__main__":
    main()

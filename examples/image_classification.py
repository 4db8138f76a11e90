"""Image classification with NODE18 (Zhuang et al., ICML 2020, experiment 3).

NODE18 is ResNet18 whose second residual block in each of its four stages is an
`ODELayer` with the dynamics f(t, x) = ReLU(BN(conv3x3(ReLU(BN(conv3x3(x)))))) integrated
over t in [0, 1]: the same layers, so the same parameter count, as ResNet18. It is trained
with each gradient mode (ACA, adjoint, naive) and compared with ResNet18 itself.

    python examples/image_classification.py [--quick] [--dataset auto|cifar10|cifar100|digits]
        [--width 64] [--epochs 90] [--runs 1] [--models aca,adjoint,naive,resnet]
        [--out-dir results/image_classification]

The defaults are the paper's recipe: SGD with learning rate 0.1, momentum 0.9, weight
decay 5e-4, batch 128, 90 epochs, the rate divided by 10 at epochs 30 and 60, random
crop and horizontal flip, Heun-Euler at rtol = atol = 1e-2, width 64 (64/128/256/512
channels). Data: CIFAR-10 or CIFAR-100 through `keras.datasets`; `--dataset auto` (the
default) uses CIFAR-10 when it can be fetched and otherwise, saying so, the 8x8 digits
that ship with scikit-learn (no flips for digits: a mirrored digit is another symbol;
crops of 1 pixel). Weight decay is Keras SGD's `weight_decay` (each step shrinks the
weights by lr x 5e-4, as PyTorch's coupled L2 does for plain SGD; with momentum PyTorch
also carries the decay in the momentum).

Every (model, run) trains in a child process of its own, so that its peak memory (the
rise of the process's resident set during training over the resident set just before,
with the high-water mark reset then) is its own. Reported per model: test
accuracy (median and range over `--runs`, the paper's test-retest comparison), seconds
per epoch, function evaluations per batch (forward, summed over the four ODE blocks) and
peak memory. The first ACA model is also evaluated with another solver and tolerance
than it was trained with (Dopri5 at 1e-3, and Heun-Euler at 1e-3), the weights unchanged.

`--jit-compile` trains with `model.compile(jit_compile=True)` (XLA), which pays on a GPU;
on a CPU, XLA runs convolution gradients inside the solver's while loop slowly: a NODE18
epoch on the digits (width 8, batch 128) takes ~6.2 s with XLA against ~2.2 s in Keras'
default uncompiled graph, measured here. `--quick` (the test suite runs it): NODE18
with ACA against ResNet18 (`--models` adds the others), digits, width 8, 8 epochs,
batch 128, a constant rate; about a minute and a half.

Writes to `--out-dir` (default `results/image_classification`; with `--quick`
`results/quick/image_classification`, ignored by git): `results.md`, `results.csv`,
`accuracy.png`. `main(argv)` returns the numbers.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

from _memory import peak_rise_mb, reset_peak_kb  # examples/_memory.py

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODELS = ("aca", "adjoint", "naive", "resnet")
PAPER = dict(dataset="auto", width=64, epochs=90, batch=128, lr=0.1, momentum=0.9,
             weight_decay=5e-4, milestones=(30, 60), method="heun_euler", rtol=1e-2,
             atol=1e-2, runs=1, jit_compile=False)
QUICK = dict(dataset="digits", width=8, epochs=8, batch=128, milestones=())
QUICK_MODELS = ("aca", "resnet")
OTHER_SOLVERS = (("dopri5", 1e-3), ("heun_euler", 1e-3))
# The test set goes through `evaluate` and `predict` in batches of this size, or whole when
# smaller (the digits' 360): CIFAR's 10,000 in 20 equal batches. Each batch shape traces
# Keras' functions, and the ODE blocks' solves in them, anew (seconds), so a smaller last
# batch would cost a second trace.
EVAL_BATCH = 500


# ----------------------------------------------------------------------------- data

def load_data(name):
    """`(x_train, y_train), (x_test, y_test), classes, description` as float32 NHWC."""
    import numpy as np

    if name in ("auto", "cifar10", "cifar100"):
        import keras

        dataset = keras.datasets.cifar100 if name == "cifar100" else keras.datasets.cifar10
        try:
            (x, y), (xt, yt) = dataset.load_data()
        except Exception as e:  # noqa: BLE001 - no network: say so, use the digits
            if name != "auto":
                raise
            print(f"CIFAR-10 could not be fetched ({type(e).__name__}); using scikit-learn's "
                  "digits instead", flush=True)
        else:
            mean = x.mean(axis=(0, 1, 2)) / 255.0
            std = x.std(axis=(0, 1, 2)) / 255.0
            norm = lambda a: ((a / 255.0 - mean) / std).astype("float32")  # noqa: E731
            classes = 100 if name == "cifar100" else 10
            return ((norm(x), y.ravel().astype("int32")), (norm(xt), yt.ravel().astype("int32")),
                    classes, f"CIFAR-{classes} (50,000 train / 10,000 test, 32x32x3)")
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x.reshape(-1, 8, 8, 1) / 16.0).astype("float32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order].astype("int32")
    split = int(0.8 * len(x))
    return ((x[:split], y[:split]), (x[split:], y[split:]), 10,
            f"scikit-learn digits ({split} train / {len(x) - split} test, 8x8x1)")


# ----------------------------------------------------------------------------- models

def build(kind, input_shape, classes, width, method="heun_euler", rtol=1e-2, atol=1e-2):
    """NODE18 (`kind` a gradient mode) or ResNet18 (`kind="resnet"`), CIFAR-style stem."""
    import keras

    import tfaca

    def conv_bn(filters, stride=1, relu=True):
        layers = [keras.layers.Conv2D(filters, 3, strides=stride, padding="same",
                                      use_bias=False),
                  keras.layers.BatchNormalization(momentum=0.9)]
        return layers + ([keras.layers.ReLU()] if relu else [])

    def basic_block(x, filters, stride):
        h = x
        for layer in conv_bn(filters, stride) + conv_bn(filters, relu=False):
            h = layer(h)
        if stride != 1 or x.shape[-1] != filters:
            x = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False)(x)
            x = keras.layers.BatchNormalization(momentum=0.9)(x)
        return keras.layers.ReLU()(keras.layers.Add()([x, h]))

    def ode_block(x, filters, name):
        # The paper's f: ReLU(BN(conv(ReLU(BN(conv(x)))))), the layers of a basic block.
        dynamics = keras.Sequential(conv_bn(filters) + conv_bn(filters), name=f"{name}_f")
        return tfaca.ODELayer(dynamics, method=method, rtol=rtol, atol=atol, gradient=kind,
                              name=name)(x)

    inputs = keras.Input(input_shape)
    x = inputs
    for layer in conv_bn(width):
        x = layer(x)
    for stage, multiple in enumerate((1, 2, 4, 8)):
        filters = width * multiple
        x = basic_block(x, filters, 1 if stage == 0 else 2)
        if kind == "resnet":
            x = basic_block(x, filters, 1)
        else:
            x = ode_block(x, filters, f"ode{stage + 1}")
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes)(x)
    return keras.Model(inputs, outputs, name="resnet18" if kind == "resnet" else f"node18_{kind}")


# ----------------------------------------------------------------------------- one run

def augmented(x, y, batch, flip):
    """The training set, shuffled each epoch, with random crops of the zero-padded image
    (4 pixels for CIFAR, 1 for 8x8 digits) and, unless `flip` is False, horizontal flips.
    Done in the input pipeline, not by Keras' random layers, which would keep the model
    from compiling with XLA."""
    import tensorflow as tf

    size = x.shape[1:]
    pad = 4 if size[0] >= 32 else 1

    def augment(image, label):
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.random_crop(image, size)
        if flip:
            image = tf.image.random_flip_left_right(image)
        return image, label

    return (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x))
            .map(augment, num_parallel_calls=tf.data.AUTOTUNE).batch(batch)
            .prefetch(tf.data.AUTOTUNE))


def child(config):
    """Trains one (model, seed) and prints its numbers as one JSON line."""
    import keras

    (x, y), (xt, yt), classes, description = load_data(config["dataset"])
    keras.utils.set_random_seed(config["seed"])
    model = build(config["model"], x.shape[1:], classes, config["width"], config["method"],
                  config["rtol"], config["atol"])
    steps_per_epoch = -(-len(x) // config["batch"])
    schedule = config["lr"]
    if config["milestones"]:
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
            [m * steps_per_epoch for m in config["milestones"]],
            [config["lr"] / 10**k for k in range(len(config["milestones"]) + 1)])
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=config["momentum"],
                                       weight_decay=config["weight_decay"]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], jit_compile=config["jit_compile"],
    )
    start_kb = reset_peak_kb()  # this training's peak, not the process's
    epoch_seconds = []
    clock = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epoch_seconds.append(-time.perf_counter()),
        on_epoch_end=lambda epoch, logs: epoch_seconds.__setitem__(
            -1, epoch_seconds[-1] + time.perf_counter()))
    history = model.fit(augmented(x, y, config["batch"], flip="digits" not in description),
                        epochs=config["epochs"], verbose=2 if config["verbose"] else 0,
                        callbacks=[clock])
    peak_mb = peak_rise_mb(start_kb)
    accuracy = model.evaluate(xt, yt, batch_size=EVAL_BATCH, verbose=0,
                              return_dict=True)["accuracy"]
    fevals = sum(history.history[f"ode{s}_fevals"][-1] for s in range(1, 5)) \
        if config["model"] != "resnet" else None
    out = dict(model=config["model"], seed=config["seed"], accuracy=float(accuracy),
               seconds_per_epoch=statistics.median(epoch_seconds[1:] or epoch_seconds),
               first_epoch_seconds=epoch_seconds[0], fevals_per_batch=fevals,
               peak_mb=peak_mb, params=int(model.count_params()), data=description,
               loss=[float(v) for v in history.history["loss"]])
    if config["model"] == "aca" and config["other_solvers"]:
        import numpy as np

        out["other_solvers"] = {}
        logits = model.predict(xt, batch_size=EVAL_BATCH, verbose=0)
        for method, tol in OTHER_SOLVERS:
            other = build("aca", x.shape[1:], classes, config["width"], method, tol, tol)
            other.set_weights(model.get_weights())
            other_logits = other.predict(xt, batch_size=EVAL_BATCH, verbose=0)
            out["other_solvers"][f"{method} rtol=atol={tol:g}"] = [
                float(np.mean(np.argmax(other_logits, axis=-1) == yt)),
                float(np.abs(other_logits - logits).max())]
    print("RESULT " + json.dumps(out), flush=True)


def run_child(config):
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)],
        stdout=subprocess.PIPE, text=True, check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    for line in proc.stdout.splitlines():
        if not line.startswith("RESULT "):
            print(line, flush=True)
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"training {config['model']} (seed {config['seed']}) failed "
                           f"with exit code {proc.returncode}")
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------- report

def summarize(runs):
    accs = [r["accuracy"] for r in runs]
    first = runs[0]
    return dict(
        model=first["model"], runs=len(runs), median=statistics.median(accs), low=min(accs),
        high=max(accs), seconds_per_epoch=statistics.median(r["seconds_per_epoch"] for r in runs),
        first_epoch_seconds=statistics.median(r["first_epoch_seconds"] for r in runs),
        fevals_per_batch=first["fevals_per_batch"], peak_mb=max(r["peak_mb"] for r in runs),
        params=first["params"],
    )


def write_results(out_dir, config, summaries, all_runs, quick):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "seed", "test accuracy", "s/epoch", "first epoch s",
                         "fevals/batch", "peak MB", "params"])
        for r in all_runs:
            writer.writerow([r["model"], r["seed"], f"{r['accuracy']:.4f}",
                             f"{r['seconds_per_epoch']:.2f}", f"{r['first_epoch_seconds']:.1f}",
                             r["fevals_per_batch"],
                             f"{r['peak_mb']:.0f}", r["params"]])
    names = {"aca": "NODE18 (ACA)", "adjoint": "NODE18 (adjoint)", "naive": "NODE18 (naive)",
             "resnet": "ResNet18"}
    lines = [
        "# Image classification: NODE18 against ResNet18",
        "",
        f"Generated by `python examples/image_classification.py{' --quick' if quick else ''}"
        f"{config['cli']}` ({'quick' if quick else 'full'} run, {time.strftime('%Y-%m-%d')}).",
        "",
        f"- Data: {all_runs[0]['data']}.",
        f"- Width {config['width']} (channels {config['width']}/{2 * config['width']}/"
        f"{4 * config['width']}/{8 * config['width']}; the paper: 64); {config['epochs']} "
        f"epochs, batch {config['batch']}, SGD lr {config['lr']:g} momentum "
        f"{config['momentum']:g} weight decay {config['weight_decay']:g}, lr ÷10 at epochs "
        f"{', '.join(map(str, config['milestones'])) or '(none)'}; ODE blocks: {config['method']} at "
        f"rtol = {config['rtol']:g}, atol = {config['atol']:g}; `model.fit`"
        f"{' with jit_compile=True (XLA)' if config['jit_compile'] else ' with Keras default compile'}"
        ", CPU.",
        f"- {config['runs']} run(s) per model (seeds 0..{config['runs'] - 1}): median test "
        "accuracy and range. s/epoch: median over the epochs after the first, which also "
        "traces the graphs (its time is the next column). Peak MB: rise of the training "
        "process's resident set during training over the set just before it. Function "
        "evaluations: forward, per batch, in the last epoch, summed over the 4 ODE blocks.",
        "",
        "| model | params | test accuracy (median) | range | s/epoch | first epoch s | "
        "fevals/batch | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        fe = "" if s["fevals_per_batch"] is None else f"{s['fevals_per_batch']:.0f}"
        lines.append(f"| {names[s['model']]} | {s['params']:,} | {s['median']:.4f} | "
                     f"{s['low']:.4f}–{s['high']:.4f} | {s['seconds_per_epoch']:.2f} | "
                     f"{s['first_epoch_seconds']:.1f} | {fe} | "
                     f"{s['peak_mb']:.0f} |")
    others = next((r["other_solvers"] for r in all_runs if "other_solvers" in r), None)
    if others:
        aca = next(r for r in all_runs if r["model"] == "aca")
        lines += ["", "The first NODE18 (ACA) model, evaluated with other solvers "
                  "(weights unchanged):", "",
                  "| solver at test time | test accuracy | max change of a logit |",
                  "|---|---|---|",
                  f"| {config['method']} rtol=atol={config['rtol']:g} (as trained) | "
                  f"{aca['accuracy']:.4f} | |"]
        lines += [f"| {k} | {acc:.4f} | {change:.2e} |" for k, (acc, change) in others.items()]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, s in enumerate(summaries):
        accs = [r["accuracy"] for r in all_runs if r["model"] == s["model"]]
        ax.scatter([k] * len(accs), accs, color=f"C{k}")
        ax.plot([k - 0.2, k + 0.2], [s["median"]] * 2, color=f"C{k}")
    ax.set_xticks(range(len(summaries)), [names[s["model"]] for s in summaries])
    ax.set_ylabel("test accuracy")
    ax.set_title(all_runs[0]["data"].split(" (")[0])
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy.png"), dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="ACA and ResNet18 on digits, width 8, 8 epochs, batch 128 (~1.5 minutes)")
    parser.add_argument("--dataset", choices=["auto", "cifar10", "cifar100", "digits"])
    parser.add_argument("--width", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--momentum", type=float)
    parser.add_argument("--weight-decay", type=float, dest="weight_decay")
    parser.add_argument("--milestones", help="epochs at which the rate is divided by 10")
    parser.add_argument("--method", help="solver of the ODE blocks")
    parser.add_argument("--rtol", type=float)
    parser.add_argument("--atol", type=float)
    parser.add_argument("--runs", type=int, help="runs per model, seeds 0..N-1")
    parser.add_argument("--jit-compile", action="store_const", const=True, dest="jit_compile",
                        help="compile training with XLA (model.compile(jit_compile=True))")
    parser.add_argument("--models", help=f"default: {','.join(MODELS)}; with --quick: "
                        f"{','.join(QUICK_MODELS)}")
    parser.add_argument("--out-dir", help="default results/image_classification; with --quick "
                        "results/quick/image_classification (ignored by git)")
    parser.add_argument("--quiet", action="store_true", help="no line per epoch")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out_dir is None:  # a quick run never overwrites the committed results
        args.out_dir = ("results/quick/" if args.quick else "results/") + "image_classification"
    config = dict(PAPER, **(QUICK if args.quick else {}))
    for key in PAPER:
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    if isinstance(config["milestones"], str):
        config["milestones"] = tuple(int(m) for m in config["milestones"].split(",") if m)
    if args.models is None:
        args.models = ",".join(QUICK_MODELS if args.quick else MODELS)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        parser.error(f"--models must name some of {', '.join(MODELS)}. "
                     f"Received: {args.models!r}")
    if config["runs"] < 1:
        parser.error(f"--runs must be at least 1. Received: {config['runs']}")
    return args, config, models


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, config, models = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return None
    config["cli"] = "".join(f" {a}" for a in argv if a != "--quick")
    all_runs = []
    for model in models:
        runs = []
        for seed in range(config["runs"]):
            print(f"--- {model}, run {seed + 1}/{config['runs']}", flush=True)
            child_config = dict(config, model=model, seed=seed, verbose=not args.quiet,
                                other_solvers=model == "aca" and seed == 0)
            r = run_child(child_config)
            print(f"{model} (seed {seed}): test accuracy {r['accuracy']:.4f}, "
                  f"{r['seconds_per_epoch']:.2f} s/epoch, fevals/batch {r['fevals_per_batch']}, "
                  f"peak {r['peak_mb']:.0f} MB", flush=True)
            runs.append(r)
            all_runs.append(r)
    summaries = [summarize([r for r in all_runs if r["model"] == m]) for m in models]
    for r in all_runs:
        for solver, (acc, change) in r.get("other_solvers", {}).items():
            print(f"aca model evaluated with {solver}: test accuracy {acc:.4f} (logits change "
                  f"by up to {change:.2e})")
    write_results(args.out_dir, config, summaries, all_runs, args.quick)
    print(f"data: {all_runs[0]['data']}")
    print(f"results written to {args.out_dir}/ (results.md, results.csv, accuracy.png)")
    return {"config": config, "summaries": summaries, "runs": all_runs}


if __name__ == "__main__":
    main()

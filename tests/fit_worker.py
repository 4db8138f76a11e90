"""Subprocess helper for tests/test_reliability.py: `model.fit` of a small `ODELayer`
model, which a callback may kill (SIGKILL) mid-epoch, resumed by
`keras.callbacks.BackupAndRestore`.

    python fit_worker.py fit OUT --backup DIR --save-freq FREQ [--kill EPOCH BATCH]
        Builds the model (same seed, same initial weights in every process) and fits it
        for EPOCHS epochs with BackupAndRestore(DIR, save_freq=FREQ), FREQ being "epoch"
        or a number of batches. With --kill, the process sends itself SIGKILL when that
        (0-based) batch of that epoch is about to start: no Python cleanup, no flushing,
        as from the kernel's OOM killer. A run that finishes writes its weights to
        OUT.npz and prints a RESULT line.

    python fit_worker.py reference OUT [--uninterrupted] [--replay EPOCH BATCHES]
        The runs to compare with, each on a fresh model: uninterrupted (fit for EPOCHS
        epochs in one call; weights to OUT.npz) and replayed (the first BATCHES batches
        of epoch EPOCH trained twice, as a resumed Keras 3 run does; see
        `replayed_fit`; weights to OUT_replay.npz).
"""

import argparse
import json
import os
import signal
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfaca  # noqa: E402

FEATURES = 4
SAMPLES = 64
BATCH = 16
STEPS_PER_EPOCH = SAMPLES // BATCH  # 4
EPOCHS = 3


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    y = np.sin(x).sum(axis=1, keepdims=True).astype("float32")
    return x, y


def build_model():
    """Dense -> ODELayer(MLP) -> Dense, compiled with Adam: its moment estimates and
    step count are training state that a backup must carry as well as the weights."""
    keras.utils.set_random_seed(0)
    dynamics = keras.Sequential(
        [keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(FEATURES)]
    )
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(FEATURES, activation="tanh"),
            tfaca.ODELayer(dynamics, rtol=1e-4, atol=1e-6),
            keras.layers.Dense(1),
        ]
    )
    # XLA off, as Keras chooses on a CPU-only machine; explicit so that every process
    # compiles the same train step.
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    return model


def fit(model, epochs, callbacks=(), x=None, y=None):
    if x is None:
        x, y = data()
    return model.fit(
        x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=list(callbacks)
    )


def replayed_fit(model, replay_epoch, replay_batches):
    """What BackupAndRestore in Keras 3 does after a backup made mid-epoch: the backup
    stores the weights (and optimizer state) after batch `replay_batches - 1` of epoch
    `replay_epoch`, but only the epoch is restored, so the resumed `fit` starts that
    epoch again from its first batch and trains its first `replay_batches` batches twice.
    """
    x, y = data()
    losses = []
    losses += fit(model, replay_epoch).history.get("loss", [])
    n = replay_batches * BATCH
    losses += fit(model, 1, x=x[:n], y=y[:n]).history["loss"]
    losses += fit(model, EPOCHS - replay_epoch).history["loss"]
    return losses


class KillAt(keras.callbacks.Callback):
    """Sends this process SIGKILL as batch `batch` of epoch `epoch` is about to start."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.kill_epoch, self.kill_batch = epoch, batch
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == (self.kill_epoch, self.kill_batch):
            os.kill(os.getpid(), signal.SIGKILL)


def save(path, model):
    np.savez(path, *model.get_weights())


def summary(model, losses):
    return {
        "losses": [float(v) for v in losses],
        "iterations": int(model.optimizer.iterations.numpy()),
    }


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["fit", "reference"])
    parser.add_argument("out")
    parser.add_argument("--backup")
    parser.add_argument("--save-freq", type=lambda v: v if v == "epoch" else int(v))
    parser.add_argument("--kill", type=int, nargs=2)
    parser.add_argument("--uninterrupted", action="store_true")
    parser.add_argument("--replay", type=int, nargs=2)
    args = parser.parse_args(argv)
    results = {}
    if args.mode == "fit":
        model = build_model()
        callbacks = [keras.callbacks.BackupAndRestore(args.backup, save_freq=args.save_freq)]
        if args.kill:
            callbacks.append(KillAt(*args.kill))
        losses = fit(model, EPOCHS, callbacks).history["loss"]
        save(args.out + ".npz", model)
        results["fit"] = summary(model, losses)
    if args.uninterrupted:
        model = build_model()
        losses = fit(model, EPOCHS).history["loss"]
        save(args.out + ".npz", model)
        results["uninterrupted"] = summary(model, losses)
    if args.replay:
        model = build_model()
        losses = replayed_fit(model, *args.replay)
        save(args.out + "_replay.npz", model)
        results["replay"] = summary(model, losses)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

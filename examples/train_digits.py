"""The main job: train a small neural-ODE classifier on scikit-learn's digits, export it.

Data: the 8x8 handwritten digits that ship with scikit-learn (1,797 images, 10 classes),
so this runs offline. The model: Dense(32) -> ODELayer(dynamics: 64 tanh units, Dopri5,
ACA gradient) -> Dense(10). Prints accuracy and the solver's cost, exports a SavedModel,
loads it back with plain TensorFlow and checks it serves the same predictions.

    python examples/train_digits.py [--epochs 15] [--export-dir outputs/digits_savedmodel]
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import tfaca  # noqa: E402


def load_data(seed=0):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order].astype("int32")
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def build_model(state=32):
    dynamics = keras.Sequential(
        [keras.layers.Dense(64, activation="tanh"), keras.layers.Dense(state)], name="dynamics"
    )
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(state, activation="tanh"),
            tfaca.ODELayer(dynamics, t=(0.0, 1.0), method="dopri5", rtol=1e-3, atol=1e-4),
            keras.layers.Dense(10),
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--export-dir", default="outputs/digits_savedmodel")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = load_data()
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    history = model.fit(
        x_train, y_train, batch_size=64, epochs=args.epochs, verbose=0,
        validation_data=(x_test, y_test),
    )
    seconds = time.perf_counter() - start
    results = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    test_acc = results["accuracy"]
    ode = model.layers[1]
    print(f"digits: {len(x_train)} train / {len(x_test)} test images, {args.epochs} epochs "
          f"in {seconds:.1f} s")
    print(f"train loss {history.history['loss'][0]:.3f} -> {history.history['loss'][-1]:.3f}")
    print(f"test accuracy {test_acc:.4f}, test loss {results['loss']:.4f}")
    print(f"ODE solves per batch, last epoch: {history.history[f'{ode.name}_steps'][-1]:.1f} "
          f"steps, {history.history[f'{ode.name}_fevals'][-1]:.1f} function evaluations "
          f"(forward)")

    model.export(args.export_dir, verbose=False)
    served = tf.saved_model.load(args.export_dir)
    logits_served = served.serve(tf.constant(x_test)).numpy()
    # The same batch as served: an adaptive solver shares one step size across a batch,
    # so a different batching (predict's 32) takes different steps.
    logits_model = model(tf.constant(x_test), training=False).numpy()
    max_diff = float(np.max(np.abs(logits_served - logits_model)))
    print(f"SavedModel exported to {args.export_dir}; served logits match the model "
          f"(max |diff| = {max_diff:.2e})")
    if max_diff > 1e-4:
        raise SystemExit("served model disagrees with the trained model")
    return test_acc


if __name__ == "__main__":
    main()

"""Why conv ODEs are slow under XLA on CPU: convolution gradients inside a while loop.

    python benchmarks/xla_conv_loop.py

Times, under `tf.function(jit_compile=True)`, each convolution op of the benchmark's conv
field (32x16x16x32 NHWC, 3x3 kernel 32->32) once on its own and once per iteration of a
5-iteration `tf.while_loop`, and prints the slowdown. Needs TensorFlow only.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ITERATIONS = 5


def _ops(y, kernel):
    strides, pad = [1, 1, 1, 1], "SAME"
    return {
        "conv2d (forward)": lambda a: tf.nn.conv2d(a, kernel, 1, pad),
        "gradient w.r.t. input": lambda a: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.shape(y), filter=kernel, out_backprop=a, strides=strides,
            padding=pad),
        "gradient w.r.t. kernel": lambda a: tf.raw_ops.Conv2DBackpropFilter(
            input=y, filter_sizes=tf.shape(kernel), out_backprop=a, strides=strides,
            padding=pad),
    }


def _time(fn, arg, repeats=3):
    fn(arg)  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tf.nest.map_structure(lambda x: x.numpy(), fn(arg))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    rng = np.random.default_rng(0)
    y = tf.constant(rng.standard_normal((32, 16, 16, 32)), tf.float32)
    kernel = tf.constant(rng.standard_normal((3, 3, 32, 32)) / 17, tf.float32)
    print("| op (XLA, CPU) | alone ms | per loop iteration ms | slowdown |\n|---|---|---|---|")
    for name, op in _ops(y, kernel).items():
        alone = tf.function(op, jit_compile=True)

        def looped(a, op=op):
            def body(i, a, acc):
                out = op(a)
                # Keep every iteration's result alive and the loop state shaped as before.
                return i + 1, a * 0.999, acc + tf.reduce_sum(out)

            return tf.while_loop(lambda i, *_: i < ITERATIONS, body, (0, a, 0.0))[2]

        looped = tf.function(looped, jit_compile=True)
        t_alone = _time(alone, y)
        t_loop = _time(looped, y) / ITERATIONS
        print(f"| {name} | {t_alone * 1e3:.1f} | {t_loop * 1e3:.1f} | {t_loop / t_alone:.0f}x |")


if __name__ == "__main__":
    main()

"""A solve too long for full ACA's memory, done with MALI and with a checkpoint budget.

    python examples/long_solve.py [--steps 4000] [--size 64] [--channels 32]

The field mixes the channels of a `size x size x channels` float32 feature map, as a
1x1-convolution block of an image model: `dy/dt = tanh(y W1) W2`, t in [0, 1], with
`--steps` fixed steps. Full ACA keeps one state per step: at the defaults, 4,000 x
0.5 MB = 2 GB of checkpoints for one gradient. Two ways round it:

- `gradient="mali"` with `method="alf"`: keeps only the end state and rebuilds each
  step's input by inverting the step; memory independent of the number of steps;
- `tfaca.ACAGradient(checkpoints=K)` with Dopri5: keeps K states and rebuilds each
  segment between them once in the backward pass; here K = sqrt(2 N), for which the
  K checkpoints and a segment of at most 2N/K states are each about sqrt(2N) states.

For each, one forward+backward in a `tf.function` (after a warm-up call) and its peak
memory above the memory before it (Linux: `/proc/self/status`), against the size of
full ACA's checkpoints. The two gradients approximate the same continuous gradient
with different solvers; their relative difference is printed as a check.
"""

import argparse
import math
import time

import numpy as np
import tensorflow as tf

import tfaca
from _memory import peak_memory_mb  # examples/_memory.py


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=32)
    a = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    c = a.channels
    w1 = tf.Variable(rng.normal(size=(c, c)) / math.sqrt(c), dtype=tf.float32)
    w2 = tf.Variable(rng.normal(size=(c, c)) / math.sqrt(c), dtype=tf.float32)
    y0 = tf.constant(rng.normal(size=(1, a.size, a.size, c)), tf.float32)

    def field(t, y):
        return tf.tensordot(tf.tanh(tf.tensordot(y, w1, 1)), w2, 1)

    state_mb = 4 * a.size * a.size * c / 2**20
    budget = math.ceil(math.sqrt(2 * a.steps))
    print(f"state {a.size}x{a.size}x{c} float32 = {state_mb:.3f} MB, {a.steps} steps: full "
          f"ACA would keep {a.steps * state_mb:.0f} MB of checkpoints")

    modes = {
        "MALI (method='alf')": dict(method="alf", gradient="mali"),
        f"ACA, checkpoints={budget} (dopri5)": dict(
            gradient=tfaca.ACAGradient(checkpoints=budget)),
    }
    results = {}
    for name, kwargs in modes.items():
        @tf.function(jit_compile=False)
        def fwdbwd(kwargs=kwargs):
            with tf.GradientTape() as tape:
                tape.watch(y0)
                y1 = tfaca.odeint(field, y0, [0.0, 1.0], step_size=1.0 / a.steps,
                                  max_steps=a.steps + 10, **kwargs)[-1]
                loss = tf.reduce_mean(tf.square(y1))
            return loss, tape.gradient(loss, [y0, w1, w2])

        fwdbwd()  # trace and warm up
        start = time.perf_counter()
        (loss, grads), memory = peak_memory_mb(lambda: [x.numpy() if hasattr(x, "numpy") else
                                                        [g.numpy() for g in x]
                                                        for x in fwdbwd()])
        seconds = time.perf_counter() - start
        results[name] = grads
        used = "n/a" if memory is None else f"{memory:.0f} MB ({memory / state_mb:.0f} states)"
        print(f"{name:32s} loss {loss:.6f}  peak memory {used}  time {seconds:.1f} s")

    (g_mali, g_budget) = results.values()
    difference = max(np.max(np.abs(a_ - b_)) / np.max(np.abs(b_))
                     for a_, b_ in zip(g_mali, g_budget))
    print(f"gradients, MALI against budgeted ACA: relative difference {difference:.1e}")
    return difference


if __name__ == "__main__":
    main()

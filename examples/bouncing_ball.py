"""Events with gradients: a bouncing ball and a hitting time (after Chen, Amos & Nickel,
"Learning Neural Event Functions for Ordinary Differential Equations", ICLR 2021, at small
scale).

1. *Bouncing ball.* A ball dropped from 10 m falls under gravity `g` with air drag
   `k v |v|` (k = 0.02, known) and bounces with restitution `e`: at each impact its
   velocity becomes `-e v`. The observations are the times of its first bounces and the
   heights of the apexes between them (noisy). `g` and `e` are learned from them with
   Adam: the model is a chain of solves, each ended by an event with two conditions,
   the height falling through zero (an impact) or the velocity falling through zero (an
   apex), whichever comes first; the next solve starts at the event's time from its state.
   The loss reads `event_t` and `event_y` only, so every gradient goes through the event
   times, by the implicit function theorem composed with ACA's replay of the steps.
   The same training with `gradient="naive"` gives the time per step of backpropagating
   through every trial step and the root finder's result.
2. *Hitting time.* Drops from 64 heights with an unknown drag coefficient `k`: a Keras
   model whose `ODELayer(event=..., return_event_time=True)` returns the time each
   sample hits the ground (per-sample events inside one solve), fitted with
   `model.fit` to the observed times.

    python examples/bouncing_ball.py [--quick] [--iterations 300] [--out-dir DIR]

Writes to `--out-dir` (default `results/bouncing_ball`; with `--quick`
`results/quick/bouncing_ball`, ignored by git): `results.md` (learned against true
parameters, errors, time per training step) and `bouncing_ball.png` (the observed bounces,
the trajectory of the initial and learned parameters, the loss per iteration). `main(argv)`
returns the numbers.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfaca  # noqa: E402

TRUE_G, TRUE_E, DRAG, DROP = 9.81, 0.8, 0.02, 10.0
START_G, START_E = 6.0, 0.5
NOISE = 0.01  # of the observed times (s) and heights (m)
TOL = dict(rtol=1e-8, atol=1e-10)


def falling(g):
    """dy/dt for y = (height, velocity) with drag."""
    return lambda t, y: tf.stack([y[..., 1], -g - DRAG * y[..., 1] * tf.abs(y[..., 1])], -1)


# The first of: the height falls through zero (an impact, index 0), the velocity falls
# through zero (an apex, index 1).
IMPACT_OR_APEX = tfaca.Event(lambda t, y: (y[0], y[1]), direction=(-1, -1))


def bounces(g, e, num_bounces, gradient="aca"):
    """The times of the first `num_bounces` impacts and the apex heights between them,
    from the drop at t = 0: a chain of solves, each ended by `IMPACT_OR_APEX`."""
    t = tf.constant(0.0, tf.float64)
    y = tf.stack([tf.constant(DROP, tf.float64), tf.constant(0.0, tf.float64)])
    times, apexes, segments = [], [], []
    while len(times) < num_bounces:
        sol = tfaca.solve(falling(g), y, tf.stack([t, t + 10.0]), event=IMPACT_OR_APEX,
                          gradient=gradient, **TOL)
        segments.append((t, y))
        t, y = sol.event_t, sol.event_y
        if len(apexes) < len(times):  # after an impact comes an apex
            apexes.append(y[0])
        else:
            times.append(t)
            y = tf.stack([y[0], -e * y[1]])  # the bounce
    return tf.stack(times), tf.stack(apexes), segments


def observations(num_bounces, seed=0):
    times, apexes, _ = bounces(tf.constant(TRUE_G, tf.float64), tf.constant(TRUE_E, tf.float64),
                               num_bounces)
    rng = np.random.default_rng(seed)
    return (times.numpy() + NOISE * rng.standard_normal(num_bounces),
            apexes.numpy() + NOISE * rng.standard_normal(num_bounces - 1))


def fit_bounces(obs_times, obs_apexes, iterations, gradient):
    g = tf.Variable(START_G, dtype=tf.float64)
    e = tf.Variable(START_E, dtype=tf.float64)
    optimizer = keras.optimizers.Adam(0.05)
    num = len(obs_times)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            times, apexes, _ = bounces(g, e, num, gradient)
            loss = (tf.reduce_mean((times - obs_times) ** 2)
                    + tf.reduce_mean((apexes - obs_apexes) ** 2))
        grads = tape.gradient(loss, [g, e])
        optimizer.apply_gradients(zip(grads, [g, e]))
        return loss

    losses = [float(step())]  # traced here
    start = time.perf_counter()
    for _ in range(iterations - 1):
        losses.append(float(step()))
    per_step = (time.perf_counter() - start) / max(iterations - 1, 1)
    return {"g": float(g.numpy()), "e": float(e.numpy()), "losses": losses,
            "ms_per_step": 1e3 * per_step}


def trajectory(g, e, num_bounces):
    """Dense heights of the bounces: each segment read on a grid up to its event (the
    outputs past an event repeat its state, cut off here)."""
    g, e = tf.constant(g, tf.float64), tf.constant(e, tf.float64)
    _, _, segments = bounces(g, e, num_bounces)
    ts_all, hs_all = [], []
    for t0, y0 in segments:
        ts = np.linspace(float(t0), float(t0) + 3.0, 300)
        sol = tfaca.solve(falling(g), y0, ts, event=IMPACT_OR_APEX, **TOL)
        keep = ts <= float(sol.event_t)
        ts_all.append(ts[keep])
        hs_all.append(sol.ys.numpy()[keep, 0])
    return np.concatenate(ts_all), np.concatenate(hs_all)


# --------------------------------------------------------------------------------------
# Hitting times: ODELayer(event=...) in model.fit
# --------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable("tfaca_examples")
class DraggedFall(keras.layers.Layer):
    """dy/dt = (v, -g - k v |v|) with the drag `k` a weight (`g` known)."""

    def build(self, input_shape):
        self.k = self.add_weight(shape=(), initializer=keras.initializers.Constant(0.2),
                                 name="k")

    def call(self, y):
        v = y[:, 1:]
        return tf.concat([v, -TRUE_G - self.k * v * tf.abs(v)], axis=1)


@keras.saving.register_keras_serializable("tfaca_examples")
def height(t, y):
    return y[:, 0]


def fit_hitting_times(true_k, epochs, seed=0):
    heights = np.linspace(5.0, 60.0, 64)
    x = np.stack([heights, np.zeros_like(heights)], 1)
    truth = tfaca.solve(lambda t, y: tf.stack([y[:, 1], -TRUE_G - true_k * y[:, 1]
                                               * tf.abs(y[:, 1])], 1),
                        tf.constant(x), [0.0, 20.0], event=tfaca.Event(height, direction=-1),
                        **TOL)
    rng = np.random.default_rng(seed)
    observed = truth.event_t.numpy() + NOISE * rng.standard_normal(len(heights))
    layer = tfaca.ODELayer(DraggedFall(), t=(0.0, 20.0), event=tfaca.Event(height, direction=-1),
                           return_event_time=True, rtol=1e-6, atol=1e-8)
    inputs = keras.Input((2,))
    _, t_hit = layer(inputs)
    model = keras.Model(inputs, t_hit)
    model.compile(keras.optimizers.Adam(0.02), "mse")
    start = time.perf_counter()
    history = model.fit(x.astype("float32"), observed.astype("float32"), epochs=epochs,
                        batch_size=16, verbose=0)
    seconds = time.perf_counter() - start
    return {"k": float(layer.dynamics.k.numpy()), "true_k": true_k,
            "loss": history.history["loss"], "s_per_epoch": seconds / epochs,
            "rmse": float(np.sqrt(np.mean((model.predict(x.astype("float32"), verbose=0)
                                           - truth.event_t.numpy()) ** 2)))}


def write_results(out_dir, args, obs, fits, hitting, quick):
    os.makedirs(out_dir, exist_ok=True)
    aca = fits["aca"]
    lines = [
        "# Events with gradients: a bouncing ball and hitting times",
        "",
        f"Written by `python examples/bouncing_ball.py{' --quick' if quick else ''}` "
        f"({args.iterations} iterations, {args.bounces} bounces, {args.epochs} epochs).",
        "",
        "## Bouncing ball: gravity and restitution from bounce times and apex heights",
        "",
        f"Dropped from {DROP} m with drag {DRAG} v|v|; observed: {args.bounces} impact times "
        f"and {args.bounces - 1} apex heights, noise {NOISE}. Dopri5 at rtol "
        f"{TOL['rtol']}, float64; each segment is a solve ended by an `Event` with two "
        "conditions (impact, apex). Adam, learning rate 0.05, from g = "
        f"{START_G}, e = {START_E}.",
        "",
        "| gradient | learned g | learned e | error g | error e | final loss | ms / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, fit in fits.items():
        lines.append(
            f"| {name} | {fit['g']:.4f} | {fit['e']:.4f} | {abs(fit['g'] - TRUE_G):.2e} | "
            f"{abs(fit['e'] - TRUE_E):.2e} | {fit['losses'][-1]:.2e} | {fit['ms_per_step']:.0f} |")
    lines += [
        "",
        f"True values: g = {TRUE_G}, e = {TRUE_E}. The two gradients are the same "
        "computation's (the event times are roots of the same interpolants), so both "
        "strategies follow the same path; they differ in cost.",
        "",
        "## Hitting times: the drag coefficient with `ODELayer(event=...)` in `model.fit`",
        "",
        f"64 drops from 5 to 60 m with drag k = {hitting['true_k']}, observed hitting times "
        f"with noise {NOISE} s; the layer's `Event` stops each sample at its own impact and "
        "`return_event_time=True` returns the times. Adam 0.02, batch 16, from k = 0.2.",
        "",
        "| learned k | true k | RMSE of the hitting times (s) | s / epoch |",
        "|---|---|---|---|",
        f"| {hitting['k']:.4f} | {hitting['true_k']} | {hitting['rmse']:.2e} | "
        f"{hitting['s_per_epoch']:.2f} |",
        "",
        "![bouncing ball](bouncing_ball.png)",
        "",
    ]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines))

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, g, e, style in (("start", START_G, START_E, ":"),
                               ("learned (ACA)", aca["g"], aca["e"], "-"),
                               ("true", TRUE_G, TRUE_E, "--")):
        ts, hs = trajectory(g, e, args.bounces)
        left.plot(ts, hs, style, label=label)
    obs_times, obs_apexes = obs
    left.plot(obs_times, np.zeros_like(obs_times), "kx", label="observed impacts")
    left.set(xlabel="t (s)", ylabel="height (m)", title="Bouncing ball")
    left.legend()
    for name, fit in fits.items():
        right.semilogy(fit["losses"], label=name)
    right.set(xlabel="iteration", ylabel="loss", title="Training loss")
    right.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "bouncing_ball.png"), dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (the tests run it)")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--bounces", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--modes", default="aca,naive")
    parser.add_argument("--out-dir", help="default results/bouncing_ball; with --quick "
                        "results/quick/bouncing_ball (ignored by git)")
    args = parser.parse_args(argv)
    if args.iterations is None:
        args.iterations = 60 if args.quick else 300
    if args.bounces is None:
        args.bounces = 3 if args.quick else 5
    if args.epochs is None:
        args.epochs = 15 if args.quick else 60
    if args.out_dir is None:
        args.out_dir = "results/quick/bouncing_ball" if args.quick else "results/bouncing_ball"
    return args


def main(argv=None):
    args = parse_args(argv)
    obs = observations(args.bounces)
    fits = {}
    for mode in args.modes.split(","):
        fits[mode] = fit_bounces(*obs, args.iterations, mode)
        fit = fits[mode]
        print(f"bouncing ball, {mode}: g = {fit['g']:.4f} (true {TRUE_G}), e = {fit['e']:.4f} "
              f"(true {TRUE_E}), loss {fit['losses'][0]:.3g} -> {fit['losses'][-1]:.3g}, "
              f"{fit['ms_per_step']:.0f} ms per step")
    hitting = fit_hitting_times(0.05, args.epochs)
    print(f"hitting times: k = {hitting['k']:.4f} (true {hitting['true_k']}), RMSE "
          f"{hitting['rmse']:.2e} s, {hitting['s_per_epoch']:.2f} s per epoch")
    write_results(args.out_dir, args, obs, fits, hitting, args.quick)
    return {"fits": fits, "hitting": hitting}


if __name__ == "__main__":
    main()

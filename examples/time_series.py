"""Irregularly sampled time series with a latent ODE (Zhuang et al., ICML 2020, experiment 4).

A latent-ODE model in the style of Rubanova, Chen & Duvenaud (2019): a GRU encoder reads
each series' irregular observations backwards in time (value and time gap) into an
initial latent state z(0); an `ODELayer` solves the latent dynamics dz/dt = MLP(z) and is
read at each sample's own times (times per sample, `(batch, n)`, padded by repeating the
last time); a linear decoder maps z(t) to the observation. Trained with `model.fit` to
reconstruct the observations, then asked for the curve at held-out times inside the
observed window (interpolation) and after it (extrapolation).

    python examples/time_series.py [--quick] [--densities 10,20,40] [--epochs 15] [--train 512]
                                   [--modes aca,adjoint,naive] [--out-dir results/time_series]

Data (generated, seeded): damped 2-D spirals x(t) = A e^{-g t} (cos(w t + p), sin(w t + p))
with A ~ U(0.5, 1.5), g ~ U(0.05, 0.25), w ~ U(0.6, 1.4), p ~ U(0, 2 pi), observed with
Gaussian noise (sd 0.05) at k times drawn uniformly in (0, 5], k ~ U{d/2, ..., d} per
series for a sampling density d (so series have different numbers of observations:
padding). Interpolation is scored at 50 evenly spaced times in (0, 5], extrapolation at
50 in (5, 10], both against the noise-free curve (mean squared error).

Compared, at each density: the latent ODE trained with each gradient mode (ACA,
adjoint, naive: same seed, same data), a recurrent baseline (the same encoder, then a GRU
decoder fed the time gaps between query times: "GRU-dt") and the trivial baseline that
predicts each series' observed mean. Reported: interpolation and extrapolation MSE,
training wall time, and the ODE's steps and function evaluations per solve (forward).

`--quick` (the test suite runs it): density 10 only, 256 training series, batch 32, 6 epochs.

Writes to `--out-dir` (default `results/time_series`; with `--quick`
`results/quick/time_series`, ignored by git): `results.md`, `results.csv` and
`trajectories.png` (fitted and extrapolated curves of a few test series). `main(argv)` returns the numbers.
"""

import argparse
import csv
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import tfaca  # noqa: E402

T_OBS, T_EXT = 5.0, 10.0
NOISE = 0.05
GRID = 50
LATENT, HIDDEN = 8, 32
MODES = ("aca", "adjoint", "naive")
FULL = dict(densities=(10, 20, 40), train=512, test=256, epochs=15, batch=64)
QUICK = dict(densities=(10,), train=256, test=64, epochs=6, batch=32)


# ----------------------------------------------------------------------------- data

def spirals(params, ts):
    """Noise-free curves `(n, len, 2)` at times `ts` `(n, len)`."""
    a, g, w, p = (params[:, i:i + 1] for i in range(4))
    decay = a * np.exp(-g * ts)
    return np.stack([decay * np.cos(w * ts + p), decay * np.sin(w * ts + p)], axis=-1)


def make_data(n, density, rng):
    """Series with `density // 2` to `density` noisy observations in (0, T_OBS].

    Returns a dict: the encoder's inputs (observations read backwards in time, padded at
    the end, with a mask), the ODE's query times for reconstruction (`[0, t_1 .. t_k]`,
    padded by repeating t_k) with their targets and sample weights, and the evaluation
    grids with their noise-free targets.
    """
    params = np.stack([rng.uniform(0.5, 1.5, n), rng.uniform(0.05, 0.25, n),
                       rng.uniform(0.6, 1.4, n), rng.uniform(0.0, 2 * np.pi, n)], axis=1)
    counts = rng.integers(density // 2, density + 1, n)
    times = np.sort(rng.uniform(0.0, T_OBS, (n, density)), axis=1)
    mask = np.arange(density)[None, :] < counts[:, None]
    # Padding repeats the last real time (the convention of ODELayer's times input).
    last = times[np.arange(n), counts - 1][:, None]
    times = np.where(mask, times, last)
    values = spirals(params, times) + NOISE * rng.standard_normal((n, density, 2))
    values = np.where(mask[..., None], values, 0.0)

    # Encoder: backwards in time, gap to the previous-read (later) observation.
    order = np.argsort(np.where(mask, -times, np.inf), axis=1, kind="stable")
    back_t = np.take_along_axis(times, order, axis=1)
    back_v = np.take_along_axis(values, order[..., None], axis=1)
    back_m = np.take_along_axis(mask, order, axis=1)
    gaps = np.diff(np.concatenate([np.full((n, 1), T_OBS), back_t], axis=1), axis=1)
    encoder = [back_v, np.where(back_m, -gaps, 0.0)[..., None], back_m]

    grid_in = np.broadcast_to(np.linspace(0.0, T_OBS, GRID + 1)[1:], (n, GRID))
    grid_out = np.broadcast_to(np.linspace(T_OBS, T_EXT, GRID + 1)[1:], (n, GRID))
    zero = np.zeros((n, 1))
    f32 = lambda x: np.ascontiguousarray(x, dtype="float32")  # noqa: E731
    return dict(
        params=params,
        encoder=[f32(encoder[0]), f32(encoder[1]), encoder[2]],
        fit_times=f32(np.concatenate([zero, times], axis=1)),
        fit_targets=f32(np.concatenate([np.zeros((n, 1, 2)), values], axis=1)),
        fit_weights=f32(np.concatenate([zero, mask], axis=1)),
        obs_times=times, obs_values=values, obs_mask=mask,
        interp_times=f32(grid_in), interp_true=spirals(params, grid_in),
        extrap_times=f32(grid_out), extrap_true=spirals(params, grid_out),
    )


# ----------------------------------------------------------------------------- models

def encoder_inputs(density):
    values = keras.Input((density, 2), name="values")
    gaps = keras.Input((density, 1), name="gaps")
    mask = keras.Input((density,), dtype="bool", name="mask")
    return [values, gaps, mask]


def encode(inputs, size):
    values, gaps, mask = inputs
    h = keras.layers.GRU(HIDDEN, name="encoder")(
        keras.layers.Concatenate()([values, gaps]), mask=mask)
    return keras.layers.Dense(size, name="to_initial_state")(h)


def latent_ode(density, mode):
    """[values, gaps, mask, query times (batch, n)] -> the curve at those times."""
    inputs = encoder_inputs(density)
    times = keras.Input((None,), name="times")
    z0 = encode(inputs, LATENT)
    dynamics = keras.Sequential(
        [keras.layers.Dense(HIDDEN, activation="tanh"), keras.layers.Dense(LATENT)],
        name="dynamics")
    z = tfaca.ODELayer(dynamics, gradient=mode, rtol=1e-3, atol=1e-4, return_sequences=True,
                       name="ode")([z0, times])
    out = keras.layers.Dense(2, name="decoder")(z)
    return keras.Model([*inputs, times], out, name=f"latent_ode_{mode}")


def gru_dt(density):
    """The recurrent baseline: the same encoder, then a GRU decoder whose input at each
    query time is the gap since the previous one."""
    inputs = encoder_inputs(density)
    times = keras.Input((None,), name="times")
    h0 = encode(inputs, HIDDEN)
    gaps = keras.layers.Lambda(
        lambda t: keras.ops.expand_dims(
            keras.ops.concatenate([t[:, :1] * 0.0, t[:, 1:] - t[:, :-1]], axis=1), -1),
        name="query_gaps")(times)
    h = keras.layers.GRU(HIDDEN, return_sequences=True, name="decoder_gru")(
        gaps, initial_state=[h0])
    out = keras.layers.Dense(2, name="decoder")(h)
    return keras.Model([*inputs, times], out, name="gru_dt")


def with_start(times):
    """Query rows for the ODE: the common start 0 first."""
    return np.concatenate([np.zeros((len(times), 1), times.dtype), times], axis=1)


def evaluate(model, data):
    out = {}
    for name in ("interp", "extrap"):
        pred = model.predict([*data["encoder"], with_start(data[f"{name}_times"])],
                             batch_size=256, verbose=0)[:, 1:]
        out[name] = float(np.mean((pred - data[f"{name}_true"]) ** 2))
        out[f"{name}_pred"] = pred
    return out


def train(model, train_data, epochs, batch, verbose):
    keras.utils.set_random_seed(1)  # the same shuffling for every model
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    start = time.perf_counter()
    history = model.fit(
        [*train_data["encoder"], train_data["fit_times"]], train_data["fit_targets"],
        sample_weight=train_data["fit_weights"], epochs=epochs, batch_size=batch,
        verbose=2 if verbose else 0,
    )
    return history, time.perf_counter() - start


def mean_baseline(data):
    counts = data["obs_mask"].sum(axis=1, keepdims=True)
    mean = (data["obs_values"] * data["obs_mask"][..., None]).sum(axis=1) / counts
    return {name: float(np.mean((mean[:, None, :] - data[f"{name}_true"]) ** 2))
            for name in ("interp", "extrap")}


# ----------------------------------------------------------------------------- report

COLUMNS = ["density", "model", "interpolation MSE", "extrapolation MSE", "train s",
           "steps/solve", "fevals/solve", "final train loss"]


def write_results(out_dir, rows, plot, quick, config):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows([[r.get(c, "") for c in COLUMNS] for r in rows])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        "# Irregularly sampled time series: latent ODE against baselines",
        "",
        f"Generated by `python examples/time_series.py{' --quick' if quick else ''}` "
        f"({'quick' if quick else 'full'} run, {time.strftime('%Y-%m-%d')}).",
        "",
        f"- {config['train']} training and {config['test']} test series of damped 2-D "
        f"spirals, noise sd {NOISE}, observed at d/2..d random times in (0, {T_OBS:g}] "
        f"(d = density); {config['epochs']} epochs, batch {config['batch']}, Adam 1e-2, "
        "`model.fit` with Keras' default compile.",
        f"- Interpolation: MSE at {GRID} times in (0, {T_OBS:g}]; extrapolation: at "
        f"{GRID} in ({T_OBS:g}, {T_EXT:g}]; against the noise-free curves of the test "
        "series.",
        f"- Latent ODE: GRU({HIDDEN}) encoder read backwards -> z(0) in R^{LATENT} -> "
        f"ODELayer(MLP {HIDDEN} tanh, Dopri5, rtol 1e-3, atol 1e-4) at each series' own "
        f"times -> linear decoder. GRU-dt: the same encoder, a GRU({HIDDEN}) decoder fed "
        "the time gaps. Mean: each series' observed mean.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    data, preds = plot
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)
    fine = np.linspace(0.0, T_EXT, 400)
    for k, ax in enumerate(axes):
        truth = spirals(data["params"][k:k + 1], fine[None])[0]
        ax.plot(fine, truth[:, 0], color="0.6", lw=2.5, label="true")
        m = data["obs_mask"][k]
        ax.plot(data["obs_times"][k][m], data["obs_values"][k][m][:, 0], "k.", label="observed")
        t_all = np.r_[data["interp_times"][k], data["extrap_times"][k]]
        for name, pred in preds.items():
            ax.plot(t_all, np.r_[pred["interp_pred"][k][:, 0], pred["extrap_pred"][k][:, 0]],
                    lw=1.2, label=name)
        ax.axvline(T_OBS, color="0.8", ls=":")
        ax.set_xlabel("t")
        ax.set_title(f"test series {k}")
    axes[0].set_ylabel("x1(t)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "trajectories.png"), dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="density 10, 256 series, 6 epochs (~1 minute)")
    parser.add_argument("--densities", default=None,
                        help="comma-separated maximum observations per series (default 10,20,40)")
    parser.add_argument("--train", type=int, default=None, help="training series")
    parser.add_argument("--test", type=int, default=None, help="test series")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out-dir", help="default results/time_series; with --quick "
                        "results/quick/time_series (ignored by git)")
    parser.add_argument("--quiet", action="store_true", help="no line per epoch")
    args = parser.parse_args(argv)
    if args.out_dir is None:  # a quick run never overwrites the committed results
        args.out_dir = "results/quick/time_series" if args.quick else "results/time_series"
    config = dict(QUICK if args.quick else FULL)
    for key in ("train", "test", "epochs", "batch"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.densities:
        config["densities"] = tuple(int(d) for d in args.densities.split(","))
    if any(d < 2 for d in config["densities"]):
        parser.error(f"--densities must be at least 2. Received: {args.densities!r}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes must name some of {', '.join(MODES)}. Received: {args.modes!r}")
    return args, config, modes


def main(argv=None):
    args, config, modes = parse_args(argv)
    rows, results, plot = [], {}, None
    for density in config["densities"]:
        rng = np.random.default_rng(density)
        train_data = make_data(config["train"], density, rng)
        test_data = make_data(config["test"], density, rng)
        print(f"=== density {density}: {config['train']} series with {density // 2}-{density} "
              f"observations in (0, {T_OBS:g}], {config['epochs']} epochs", flush=True)
        preds = {}
        candidates = [(f"latent ODE ({mode})", mode) for mode in modes] + [("GRU-dt", None)]
        for name, mode in candidates:
            keras.utils.set_random_seed(0)  # the same initial weights for every mode
            model = latent_ode(density, mode) if mode else gru_dt(density)
            history, seconds = train(model, train_data, config["epochs"], config["batch"],
                                     not args.quiet)
            scores = evaluate(model, test_data)
            row = {"density": density, "model": name, "interpolation MSE": scores["interp"],
                   "extrapolation MSE": scores["extrap"], "train s": round(seconds, 1),
                   "final train loss": float(history.history["loss"][-1])}
            if mode:
                row["steps/solve"] = round(float(history.history["ode_steps"][-1]), 1)
                row["fevals/solve"] = round(float(history.history["ode_fevals"][-1]), 1)
            rows.append(row)
            preds[name] = scores
            print(f"{name}: interpolation MSE {scores['interp']:.4g}, extrapolation MSE "
                  f"{scores['extrap']:.4g}, {seconds:.1f} s", flush=True)
        mean = mean_baseline(test_data)
        rows.append({"density": density, "model": "series mean",
                     "interpolation MSE": mean["interp"], "extrapolation MSE": mean["extrap"]})
        print(f"series mean: interpolation MSE {mean['interp']:.4g}, extrapolation MSE "
              f"{mean['extrap']:.4g}", flush=True)
        results[density] = {r["model"]: r for r in rows if r["density"] == density}
        plot = (test_data, preds)
    write_results(args.out_dir, rows, plot, args.quick, config)
    print(f"results written to {args.out_dir}/ (results.md, results.csv, trajectories.png)")
    return {"config": config, "results": results}


if __name__ == "__main__":
    main()

"""Quick versions of the examples (`examples/`), run as a user would run them."""

import importlib.util
import pathlib
import re
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import MODES


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    """examples/<name>.py as a module, examples/ importable as when it runs as a script."""
    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_digits_trains_exports_and_serves(tmp_path, capsys):
    example = _load("train_digits")
    export_dir = tmp_path / "served"
    accuracy = example.main(["--epochs", "3", "--export-dir", str(export_dir)])
    out = capsys.readouterr().out
    assert accuracy > 0.85, out
    loss_first, loss_last = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert loss_last < 0.5 * loss_first
    # The export is a plain SavedModel: plain TensorFlow serves it.
    served = tf.saved_model.load(str(export_dir))
    x = np.random.default_rng(1).uniform(size=(5, 64)).astype("float32")
    assert served.serve(tf.constant(x)).shape == (5, 10)


def _png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The quick suite runs each example's quick version with ACA alone; the slow suite with
# every mode the example compares.
ALL_MODES = "aca,adjoint,naive"


@pytest.mark.slow  # 15-17 s each; the quick suite keeps the example's data and defaults
@pytest.mark.parametrize("modes", ["aca", ALL_MODES])
def test_three_body_quick_learns_the_masses(tmp_path, capsys, modes):
    example = _load("three_body")
    result = example.main(["--quick", "--quiet", "--modes", modes, "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    truth = np.array(example.TRUE_MASSES)
    initial_error = np.max(np.abs(np.random.default_rng(0).uniform(0.9, 1.1, 3) - truth))
    runs = result["results"]
    assert sorted(runs) == sorted(modes.split(","))
    for mode, r in runs.items():
        assert f"{mode}: masses (" in out
        # The loss falls by orders of magnitude and the masses approach the truth.
        assert min(r["history"]) < 1e-2 * r["history"][0], (mode, r["history"])
        assert r["mass_error"] < 0.25 * initial_error, (mode, r["masses"])
        assert np.isfinite(r["test_error"]) and r["steps"] > 10
    # Three ways to the same gradient of the same solve: the same masses (to the
    # adjoint's reverse-solve tolerance).
    for mode in set(runs) - {"aca"}:
        np.testing.assert_allclose(runs[mode]["masses"], runs["aca"]["masses"], atol=1e-3)
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {mode} |" in table for mode in runs)
    assert len((tmp_path / "results.csv").read_text().strip().splitlines()) == 1 + len(runs)
    assert _png(tmp_path / "loss.png") and _png(tmp_path / "orbits.png")


def test_three_body_defaults_are_the_papers():
    example = _load("three_body")
    _, setup, modes = example.parse_args([])
    assert setup == dict(epochs=100, observations=1000, t_train=1.0, t_test=2.0, rtol=1e-7,
                         atol=1e-7, learning_rate=0.1, beta_1=0.5, beta_2=0.5, decay=0.95,
                         train_weight=0.01, test_weight=0.1)
    assert modes == ["aca", "adjoint", "naive"]
    assert example.TRUE_MASSES == (1.1, 1.1, 0.9)
    assert example.R0 == ((0.0, 0.2, 0.0), (0.5, 0.0, 0.5), (0.0, 0.0, 0.5))
    assert example.V0 == ((0.0, 0.1, 0.0), (0.0, 0.0, 0.1), (0.1, 0.0, 0.0))
    assert (example.G, example.M_ND, example.R_ND, example.V_ND) == (
        6.67408e-11, 1.989e30, 5.326e12, 30000.0)
    # Newton's gravity: a body pulled towards the others, in proportion to their masses.
    gravity = example.Gravity(example.TRUE_MASSES, dtype="float64")
    dy = gravity(tf.constant(example.initial_state()[None])).numpy()[0]
    np.testing.assert_allclose(dy[:9], example.K2 * example.initial_state()[9:])
    r = np.array(example.R0)
    pull = sum(m * (r[j] - r[0]) / np.linalg.norm(r[j] - r[0]) ** 3
               for j, m in zip((1, 2), example.TRUE_MASSES[1:]))
    np.testing.assert_allclose(dy[9:12], example.K1 * pull)


@pytest.mark.slow  # 15-17 s each; the quick suite keeps the example's data and defaults
@pytest.mark.parametrize("modes", ["aca", ALL_MODES])
def test_time_series_quick_beats_the_series_mean(tmp_path, capsys, modes):
    example = _load("time_series")
    result = example.main(["--quick", "--quiet", "--modes", modes, "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    (density, runs), = result["results"].items()
    mean = runs["series mean"]
    assert len(runs) == len(modes.split(",")) + 2  # and the GRU and the mean
    for mode in modes.split(","):
        r = runs[f"latent ODE ({mode})"]
        assert f"latent ODE ({mode}): interpolation MSE" in out
        assert r["interpolation MSE"] < 0.6 * mean["interpolation MSE"], (mode, r, mean)
        assert r["extrapolation MSE"] < mean["extrapolation MSE"], (mode, r, mean)
        assert r["fevals/solve"] > 0
    assert np.isfinite(runs["GRU-dt"]["interpolation MSE"])
    table = (tmp_path / "results.md").read_text()
    assert "| GRU-dt |" in table and "| series mean |" in table
    assert _png(tmp_path / "trajectories.png")


def test_time_series_data_has_per_sample_times_and_padding():
    example = _load("time_series")
    data = example.make_data(32, 10, np.random.default_rng(0))
    times, weights = data["fit_times"], data["fit_weights"]
    assert np.all(times[:, 0] == 0.0) and np.all(np.diff(times, axis=1) >= 0.0)
    assert len({tuple(row) for row in times}) == 32  # every series its own times
    counts = weights.sum(axis=1)
    assert counts.min() >= 5 and counts.max() <= 10 and counts.min() < counts.max()
    # Padding repeats the last observed time and carries no weight.
    for row, w in zip(times, weights):
        k = int(w.sum())
        assert np.all(row[k + 1:] == row[k]) and np.all(w[k + 1:] == 0.0)
    _, config, modes = example.parse_args([])
    assert config["densities"] == (10, 20, 40) and modes == ["aca", "adjoint", "naive"]


@pytest.mark.slow  # 50 s on 2 cores: the quick suite's budget
@pytest.mark.parametrize("models", [["--models", "aca"], []])  # [] : the quick set
def test_image_classification_quick_beats_chance(tmp_path, capsys, models):
    example = _load("image_classification")
    result = example.main(["--quick", "--quiet", *models, "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    summaries = {s["model"]: s for s in result["summaries"]}
    # The quick set is ACA's NODE18 and ResNet18; the full run has all 4.
    assert sorted(summaries) == (["aca"] if models else ["aca", "resnet"])
    for name, s in summaries.items():
        assert s["median"] > 0.5, (name, s)  # chance: 0.1
    if not models:
        # NODE18 has ResNet18's layers, so its parameter count.
        assert summaries["aca"]["params"] == summaries["resnet"]["params"]
    aca = next(r for r in result["runs"] if r["model"] == "aca")
    assert aca["fevals_per_batch"] > 0 and aca["peak_mb"] > 0
    assert len(aca["other_solvers"]) == 2
    for accuracy, change in aca["other_solvers"].values():
        assert accuracy > 0.5 and change > 0.0  # another solve, much the same model
    table = (tmp_path / "results.md").read_text()
    assert "| NODE18 (ACA) |" in table and ("| ResNet18 |" in table) == (not models)
    assert len((tmp_path / "results.csv").read_text().strip().splitlines()) == 1 + len(summaries)
    assert _png(tmp_path / "accuracy.png")
    assert "data: scikit-learn digits" in out


def test_image_classification_defaults_are_the_papers():
    example = _load("image_classification")
    _, config, models = example.parse_args([])
    assert config == dict(dataset="auto", width=64, epochs=90, batch=128, lr=0.1, momentum=0.9,
                          weight_decay=5e-4, milestones=(30, 60), method="heun_euler",
                          rtol=1e-2, atol=1e-2, runs=1, jit_compile=False)
    assert models == ["aca", "adjoint", "naive", "resnet"]
    node = example.build("aca", (8, 8, 1), 10, 4)
    resnet = example.build("resnet", (8, 8, 1), 10, 4)
    assert node.count_params() == resnet.count_params()
    odes = [layer for layer in node.layers if isinstance(layer, tfaca.ODELayer)]
    assert len(odes) == 4 and all(o.method == "heun_euler" for o in odes)
    assert all((o.rtol, o.atol) == (1e-2, 1e-2) for o in odes)


def test_long_solve_runs_with_mali_and_a_budget(capsys):
    """The quick version of examples/long_solve.py: both memory-light gradients run and
    agree (two solvers approximating one continuous gradient)."""
    difference = _load("long_solve").main(["--steps", "200", "--size", "16"])
    out = capsys.readouterr().out
    assert "full ACA would keep" in out and "MALI" in out and "checkpoints=20" in out
    assert difference < 1e-4


@pytest.mark.parametrize(
    "name", ["three_body", "time_series", "image_classification", "gradient_accuracy",
             "irregular_classification", "bouncing_ball", "stiff_kinetics"])
def test_quick_runs_never_write_over_the_committed_results(name):
    example = _load(name)

    def out_dir(*argv):
        parsed = example.parse_args(list(argv))
        return (parsed[0] if isinstance(parsed, tuple) else parsed).out_dir

    assert out_dir() == f"results/{name}"  # full runs: the committed results
    assert out_dir("--quick") == f"results/quick/{name}"
    assert out_dir("--quick", "--out-dir", "elsewhere") == "elsewhere"
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/results/quick/" in ignored


@pytest.mark.slow  # 47 s on 2 cores; ACA = unrolled and the adjoint's drift: test_aca, test_adjoint
def test_gradient_accuracy_example_quick(tmp_path):
    example = _load("gradient_accuracy")
    out_dir = tmp_path / "out"  # does not exist yet: the example creates it
    result = example.main(["--quick", "--out-dir", str(out_dir)])

    for name in ("reverse_trajectory.png", "gradient_error.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (out_dir / "gradient_error.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 3 * 3  # header + 3 T values x 3 strategies
    assert "| adjoint |" in (out_dir / "gradient_error.md").read_text()
    cost_md = (out_dir / "cost.md").read_text()
    assert all(f"| {mode} |" in cost_md for mode in MODES)

    assert result["reverse_error_t0"] > 1e-3
    assert result["aca_vs_unrolled"] < 1e-12
    for t, err in result["errors"]["aca"].items():
        assert err["rel_err_y0"] < 1e-3 and err["rel_err_A"] < 1e-3, (t, err)
    cost = result["cost"]
    assert cost["aca"]["num_steps"] >= 50
    assert cost["aca"]["backward_fevals"] == 6 * cost["aca"]["num_steps"]  # dopri5 replays 6 stages
    assert cost["naive"]["backward_fevals"] == 0
    assert cost["adjoint"]["backward_fevals"] > 0
    for mode in MODES:
        assert cost[mode]["forward_backward_ms"] > 0
        assert cost[mode]["peak_rss_rise_mb"] >= 0  # measured in the process (--quick)


def test_irregular_classification_drops_values_and_pads_each_series():
    example = _load("irregular_classification")
    rng = np.random.default_rng(0)
    times, values, labels = example.trajectories(200, rng)
    assert times.shape == (200, example.LENGTH) and values.shape[2] == example.CHANNELS
    assert set(labels) == set(range(example.CLASSES))
    t, v, mask = example.drop(times, values, 0.7, rng)
    np.testing.assert_array_equal(mask, np.isfinite(v))
    steps = np.diff(t, axis=1)
    assert np.all(steps >= 0) and np.all(t[:, 0] == 0.0)
    # Each row: strictly increasing, then repeats of its last time (padding).
    moving = steps > 0
    assert np.all(moving[:, 1:] <= moving[:, :-1])
    real = np.concatenate([np.ones((200, 1), bool), moving], axis=1)
    assert real.sum(axis=1).min() < example.LENGTH  # times with nothing observed went
    # 70 % of the values are gone; among the times left (0.7^3 of them went whole) a
    # value is observed with probability 0.3 / (1 - 0.7^3) = 0.46.
    kept = mask[real].mean()
    assert 0.42 < kept < 0.5, kept
    assert np.all(mask[:, 0])


def test_irregular_classification_reads_the_uea_ts_format(tmp_path):
    example = _load("irregular_classification")
    path = tmp_path / "CharacterTrajectories_TRAIN.ts"
    path.write_text("# comment\n@problemName CharacterTrajectories\n@classLabel true a b\n"
                    "@data\n1,2,3:4,5,6:b\n1,2,3,4:5,?,7,8:a\n")
    times, values, labels = example.read_ts(path)
    np.testing.assert_array_equal(labels, [1, 0])
    assert values.shape == (2, 4, 2)
    np.testing.assert_allclose(times[0], [0.0, 0.5, 1.0, 1.0])  # padded by repeating
    np.testing.assert_allclose(values[0, :, 1], [4, 5, 6, 6])
    assert np.isnan(values[1, 1, 1]) and values[1, 3, 0] == 4


@pytest.mark.slow
def test_irregular_classification_quick_runs_every_model(tmp_path):
    example = _load("irregular_classification")
    rows = example.main(["--quick", "--quiet", "--out-dir", str(tmp_path)])
    assert [r["model"] for r in rows] == ["neural CDE", "ODE-RNN", "GRU-dt", "GRU-D"]
    assert all(0.0 <= r["test accuracy"] <= 1.0 for r in rows)
    assert rows[0]["steps/solve"] > 1 and rows[1]["steps/solve"] > 0
    for name in ("results.md", "results.csv", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow  # about 2 minutes on 2 cores (tracing a chain of event-ended solves)
def test_bouncing_ball_quick_learns_from_events(tmp_path, capsys):
    example = _load("bouncing_ball")
    result = example.main(["--quick", "--out-dir", str(tmp_path)])
    fits = result["fits"]
    # Both gradients are the same computation's: the same path to rounding.
    np.testing.assert_allclose(fits["aca"]["g"], fits["naive"]["g"], rtol=1e-6)
    for fit in fits.values():
        assert fit["losses"][-1] < 0.1 * fit["losses"][0]
        assert abs(fit["e"] - example.TRUE_E) < abs(example.START_E - example.TRUE_E) / 3
    hitting = result["hitting"]
    assert abs(hitting["k"] - hitting["true_k"]) < 0.2 * hitting["true_k"]
    assert "| aca |" in (tmp_path / "results.md").read_text()
    assert _png(tmp_path / "bouncing_ball.png")


def test_stiff_kinetics_dynamics_are_robertsons():
    example = _load("stiff_kinetics")
    assert example.TRUE_K == (0.04, 1e4, 3e7) and example.Y0 == (1.0, 0.0, 0.0)
    y = np.array([0.7, 2e-5, 0.3])
    k1, k2, k3 = example.TRUE_K
    expected = [-k1 * y[0] + k2 * y[1] * y[2], k1 * y[0] - k2 * y[1] * y[2] - k3 * y[1] ** 2,
                k3 * y[1] ** 2]
    dy = example.robertson(0.0, tf.constant(y), tf.constant(np.log(example.TRUE_K))).numpy()
    np.testing.assert_allclose(dy, expected, rtol=1e-12)
    np.testing.assert_allclose(example.rhs(y), expected, rtol=1e-12)
    assert abs(dy.sum()) < 1e-12  # mass is conserved
    # The Jacobian the diagnostics read, against central differences.
    eps = 1e-9
    columns = [(example.rhs(y + eps * e) - example.rhs(y - eps * e)) / (2 * eps) for e in np.eye(3)]
    np.testing.assert_allclose(example.jacobian(y), np.stack(columns, 1), rtol=1e-5, atol=1e-6)
    # Each constant starts a factor 2-5 from the truth.
    assert all(2 <= max(f, 1 / f) <= 5 for f in example.START_FACTORS)


@pytest.mark.slow  # about 30 s on 2 cores (tracing and XLA-compiling six solves)
def test_stiff_kinetics_quick_learns_the_rates_where_dopri5_stalls(tmp_path, capsys):
    example = _load("stiff_kinetics")
    result = example.main(["--quick", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    fit = result["fit"]
    start = np.array(example.START_K)
    truth = np.array(example.TRUE_K)
    learned = np.array(fit["k"])
    # Each learned constant is far closer to the truth than where it started (off by
    # factors 3, 1/4, 4), and the loss falls to near the noise's.
    off, start_off = np.abs(np.log(learned / truth)), np.abs(np.log(start / truth))
    assert np.all(off < 0.1 * start_off), learned
    assert fit["losses"][-1] < 1e-2 * fit["losses"][0]
    assert fit["losses"][-1] < 2 * result["noise_loss"]
    assert 0 < fit["last_stats"]["steps"] < 200 and fit["last_stats"]["fevals_backward"] > 0
    kvaerno5, kvaerno3, _, dopri5, kvaerno5_short = result["solvers"]
    assert [r["method"] for r in result["solvers"]] == [
        "kvaerno5", "kvaerno3", "dopri5", "dopri5", "kvaerno5"]
    assert kvaerno5["status"] == kvaerno3["status"] == "SUCCESS"
    assert kvaerno5["t_final"] == example.T_END and kvaerno5["steps"] < 200
    # Dopri5 runs out of steps far from the end, having taken 10x Kvaerno5's steps over
    # the whole span in the few seconds it got through, a fifth of its trials rejected.
    assert dopri5["status"] == "MAX_STEPS_REACHED" and dopri5["t_final"] < 1e-3 * example.T_END
    assert dopri5["steps"] > 10 * kvaerno5["steps"]
    assert 0.05 < dopri5["rejected"] / (dopri5["steps"] + dopri5["rejected"]) < 0.5
    assert kvaerno5_short["t_final"] == dopri5["t_final"]
    assert kvaerno5_short["steps"] < 0.01 * dopri5["steps"]
    assert "MAX_STEPS_REACHED" in out and "k1 (y1 -> y2)" in out
    assert "| dopri5 |" in (tmp_path / "results.md").read_text()
    assert _png(tmp_path / "stiff_kinetics.png")

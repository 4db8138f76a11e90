"""`ODELayer` under real `tf.distribute` strategies, each in its own processes.

- MirroredStrategy over two logical CPU devices: a strategy needs its devices configured
  before TensorFlow initializes them, which this pytest process has long done, so
  `distribute_worker.py mirrored` runs in a subprocess and prints its results as JSON.
- MultiWorkerMirroredStrategy with two worker processes talking gRPC on 127.0.0.1; each
  writes its final weights to an .npz file that the test compares.

Exact comparisons use the fixed-step rk4 solver: the adaptive solver shares one step
size across the batch it solves (see `distribute_worker.mirrored_fixed_step`), so a
replica solving half the batch legitimately takes other steps than one solve of the
whole batch. The adaptive (dopri5) cases check that training works and stays close.
"""

import json
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import distribute_worker as dw
from helpers import child_env

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
WORKER = TESTS / "distribute_worker.py"
TIMEOUT = 900  # seconds for a whole subprocess run: a hang fails instead of blocking




def _result_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"no RESULT line in the output:\n{stdout[-5000:]}"
    return json.loads(lines[0][len("RESULT "):])


def _tail(path, n=6000):
    return path.read_text(errors="replace")[-n:]


def _run_processes(commands, envs, log_dir):
    """Runs the commands side by side with stdout/stderr in files; returns their return
    codes. If one fails or the deadline passes, every process still running is killed
    (a worker whose peer died would otherwise wait for it)."""
    procs, logs = [], []
    try:
        for i, (command, env) in enumerate(zip(commands, envs)):
            out = open(log_dir / f"proc{i}.out", "w")
            err = open(log_dir / f"proc{i}.err", "w")
            logs += [out, err]
            procs.append(
                subprocess.Popen(command, env=env, stdout=out, stderr=err, cwd=str(ROOT))
            )
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        return [p.poll() for p in procs]  # None: still running, killed below
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()


def _outputs(log_dir, i):
    return (log_dir / f"proc{i}.out").read_text(), _tail(log_dir / f"proc{i}.err")


# --------------------------------------------------------------------------------------
# MirroredStrategy, two logical CPUs, one subprocess per group of scenarios.


def _run_mirrored(tmp_path_factory, scenarios):
    log_dir = tmp_path_factory.mktemp("mirrored")
    command = [sys.executable, str(WORKER), "mirrored", ",".join(scenarios)]
    (code,) = _run_processes([command], [child_env()], log_dir)
    stdout, stderr = _outputs(log_dir, 0)
    assert code == 0, f"mirrored worker: exit code {code} (None: timed out)\n{stderr}"
    result = _result_line(stdout)
    result["stderr"] = stderr
    assert result["num_replicas"] == 2, result
    assert len(result["devices"]) == 2, result
    return result


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """The quick suite's scenario: a step on two replicas equals one on one device."""
    return _run_mirrored(tmp_path_factory, ["fixed_step"])


@pytest.fixture(scope="module")
def mirrored_more(tmp_path_factory):
    """The slow suite's: adaptive steps, training over epochs, BatchNorm in the dynamics,
    partial and empty replica batches, the series layers."""
    return _run_mirrored(tmp_path_factory,
                         ["adaptive_step", "per_sample_step", "adaptive_training", "batchnorm",
                          "partial_batch", "empty_replica_batches", "series_layers"])


def _scenario(mirrored, name):
    result = mirrored[name]
    assert "error" not in result, f"{name}: {result['error']}\n{mirrored['stderr']}"
    return result


def test_mirrored_fixed_step_update_equals_single_device(mirrored):
    r = _scenario(mirrored, "fixed_step")
    assert r["init_diff"] == 0.0  # set_weights reached both replicas' copies
    assert r["train_steps"] == 1 and np.isfinite(r["loss"])
    assert r["finite"]
    # The step changed the weights, by the same amount as on one device...
    assert r["max_update"] > 1e-3
    # ...and to the same values: 2 replicas x 16 samples == 1 device x 32 samples.
    assert r["max_diff_vs_single"] < 1e-5, r
    # The layer's cost metrics come through the distributed fit: rk4 at h=0.25 over
    # [0, 1] is 4 steps of 4 evaluations, plus the initial one.
    assert r["ode_steps"] == 4.0
    assert r["ode_fevals"] == 17.0


@pytest.mark.slow
def test_mirrored_per_sample_step_update_equals_single_device(mirrored_more):
    """With per-sample steps an adaptive solve does not depend on how the batch is split."""
    r = _scenario(mirrored_more, "per_sample_step")
    assert r["finite"] and r["max_update"] > 1e-3
    assert r["max_diff_vs_single"] < 1e-5, r
    shared = _scenario(mirrored_more, "adaptive_step")
    assert r["max_diff_vs_single"] < shared["max_diff_vs_single"], (r, shared)


@pytest.mark.slow
def test_mirrored_series_layers_update_equals_single_device(mirrored_more):
    """CDELayer, ODELayer(control=...) and ODERNNCell in one model under MirroredStrategy:
    the update of one step equals one device's to float32 round-off."""
    r = _scenario(mirrored_more, "series_layers")
    assert r["finite"] and np.isfinite(r["loss"])
    assert r["max_update"] > 1e-3
    assert r["max_diff_vs_single"] < 1e-5, r


@pytest.mark.slow
def test_mirrored_adaptive_step_is_close_to_single_device(mirrored_more):
    r = _scenario(mirrored_more, "adaptive_step")
    assert r["finite"]
    assert r["max_update"] > 1e-3
    # Not equal (each replica picks its own steps), but within the solver's tolerance.
    assert r["max_diff_vs_single"] < 1e-3, r


@pytest.mark.slow
def test_mirrored_adaptive_fit_trains(mirrored_more):
    r = _scenario(mirrored_more, "adaptive_training")
    assert r["epochs"] == 4
    assert r["finite"]
    losses = r["loss_history"]
    assert all(np.isfinite(losses)), losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert r["final_loss"] < 0.75 * r["initial_loss"], r
    assert r["ode_fevals"] > 7  # an adaptive dopri5 solve: initial step search and >= 1 step


@pytest.mark.slow
def test_mirrored_batchnorm_dynamics_per_replica_statistics(mirrored_more):
    """BatchNorm in the dynamics: each replica's moving statistics are those of one
    device on that replica's half batch (ACA updates them in the replay, before the
    weights change); the weights are the mean of the two half-batch SGD results."""
    r = _scenario(mirrored_more, "batchnorm")
    assert r["finite"]
    assert r["max_update"] > 1e-3
    assert r["max_diff_vs_mean_of_halves"] < 1e-5, r
    for name, s in r["stats"].items():
        assert s["num_copies"] == 2, (name, s)
        assert min(s["max_change"]) > 1e-3, (name, s)  # the replay did update them
        assert max(s["max_diff_vs_half"]) < 1e-6, (name, s)


# --------------------------------------------------------------------------------------
# MultiWorkerMirroredStrategy, two worker processes on 127.0.0.1.


def _free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def multiworker(tmp_path_factory):
    import tensorflow as tf

    out_dir = tmp_path_factory.mktemp("multiworker")
    # The common starting point, and the single-device reference, in this process.
    reference = {}
    x, y = dw.multiworker_data()
    init = dw.build_model("rk4", step_size=0.25).get_weights()
    init_path = out_dir / "init.npz"
    dw.save_weights(init_path, init)
    for method, step_size, epochs in (("rk4", 0.25, 1), ("dopri5", None, 2)):
        model = dw.build_model(method, step_size=step_size)
        model.set_weights(init)
        losses = dw.train_custom_loop(tf.distribute.get_strategy(), model, x, y, epochs)
        reference[method] = {"weights": model.get_weights(), "losses": losses}

    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    envs = [
        child_env({"cluster": cluster, "task": {"type": "worker", "index": i}})
        for i in range(2)
    ]
    command = [sys.executable, str(WORKER), "multiworker", str(out_dir), str(init_path)]
    codes = _run_processes([command, command], envs, out_dir)
    results = []
    for i, code in enumerate(codes):
        stdout, stderr = _outputs(out_dir, i)
        assert code == 0, f"worker {i}: exit code {code} (None: timed out)\n{stderr}"
        results.append(_result_line(stdout))
    weights = {
        method: [dw.load_weights(out_dir / f"worker{i}_{method}.npz") for i in range(2)]
        for method in ("rk4", "dopri5")
    }
    return {"init": init, "reference": reference, "results": results, "weights": weights}


@pytest.mark.slow
def test_multiworker_workers_form_one_cluster(multiworker):
    assert [r["index"] for r in multiworker["results"]] == [0, 1]
    assert all(r["num_replicas"] == 2 for r in multiworker["results"])


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
@pytest.mark.slow
def test_multiworker_workers_end_with_equal_changed_weights(multiworker, method):
    w0, w1 = multiworker["weights"][method]
    init = multiworker["init"]
    assert dw.all_finite(w0) and dw.all_finite(w1)
    for a, b in zip(w0, w1):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert dw.max_abs_diff(w0, init) > 1e-3
    # Both workers saw the same global losses (all-reduced).
    losses = [r[f"{method}_loss"] for r in multiworker["results"]]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    assert len(losses[0]) == {"rk4": 4, "dopri5": 8}[method]
    assert all(np.isfinite(losses[0]))


@pytest.mark.slow
def test_multiworker_fixed_step_equals_single_device(multiworker):
    """Two workers x 16 samples per step == one device x 32 samples, step for step."""
    reference = multiworker["reference"]["rk4"]
    w0, _ = multiworker["weights"]["rk4"]
    assert dw.max_abs_diff(w0, reference["weights"]) < 1e-5
    np.testing.assert_allclose(
        multiworker["results"][0]["rk4_loss"], reference["losses"], rtol=1e-5
    )


@pytest.mark.slow
def test_multiworker_adaptive_trains_close_to_single_device(multiworker):
    reference = multiworker["reference"]["dopri5"]
    w0, _ = multiworker["weights"]["dopri5"]
    losses = multiworker["results"][0]["dopri5_loss"]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])  # second epoch beats the first
    # Each worker picks its own adaptive steps: close to one device, not equal.
    assert dw.max_abs_diff(w0, reference["weights"]) < 1e-3


# --------------------------------------------------------------------------------------
# Empty per-replica batches. Kept last so that, run with -x, a failure here does not
# hide the tests above.


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
@pytest.mark.slow
def test_mirrored_partial_last_batch(mirrored_more, method):
    """33 samples at global batch 32: the last global batch has one sample, so one
    replica gets an empty (0-row) batch. fit and predict must still work."""
    r = _scenario(mirrored_more, "partial_batch")[method]
    assert r["error"] is None, f"{method}: {r['error']}"
    assert np.isfinite(r["loss"]) and r["finite"]
    assert r["predictions_shape"] == [dw.GLOBAL_BATCH + 1, dw.NUM_CLASSES]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["per_sample", "times_per_sample"])
def test_mirrored_empty_replica_batch_with_per_sample_steps_and_times(mirrored_more, model):
    """5 samples at global batch 4: one replica gets an empty batch, with
    `ODELayer(per_sample=True)` and with a `[state, times]` input (times per sample, one
    row all padding). fit and predict run and stay finite (both crashed before)."""
    r = _scenario(mirrored_more, "empty_replica_batches")[model]
    assert r["error"] is None, f"{model}: {r['error']}"
    assert np.isfinite(r["loss"]) and r["finite"]
    assert r["predictions_shape"] == [5, dw.NUM_CLASSES]

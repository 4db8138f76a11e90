"""Step control (issue 31): PID against integral control, `jump_ts` at a switched input,
the adjoint's seminorm against its full norm.

    python benchmarks/step_control.py [--quick] [--out benchmarks/step_control.md]

For each problem, tfaca's default mode (Dopri5, ACA, a plain `tf.function`) with the
integral controller (the default, `controller=None`) and two of Söderlind's PI controllers,
`PIDController(0.4, 0.3, 0)` (diffrax's suggestion) and `(0.2, 0.4, 0)`: accepted steps,
rejected trials, forward evaluations, the median time of a forward+backward call, and the
error of y(T) against a float64 solve at rtol 1e-10. The problems are the benchmark
problems (`problems.py`: MLP, conv, three-body, float32 at their tolerances) and two
mildly stiff Van der Pol oscillators (mu = 10 and 100, float64, rtol 1e-5), where the
integral controller's step size oscillates at Dopri5's stability boundary.

`jump_ts`: a neural-ODE-sized linear system driven by a piecewise-constant input that
switches at t = 1, ..., 9 (a dosing schedule), solved with and without the switch times
in `jump_ts`: trials, time and the error against the exact solution.

Seminorm: the adjoint's reverse solve on the MLP problem (float32 at its tolerance, and
float64 at rtol 1e-6 and 1e-8), and on a small MLP from one sample (float64), with `AdjointGradient()` and `AdjointGradient(norm=
"seminorm")`: reverse steps, rejected trials and evaluations, time, and the gradient's
error against ACA's in float64 at rtol 1e-10 (relative, max over every weight).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfaca  # noqa: E402
from run import write_report  # noqa: E402
from runners import TfacaRunner, _median_time  # noqa: E402

CONTROLLERS = {
    "integral": None,
    "PI (0.4, 0.3, 0)": tfaca.PIDController(0.4, 0.3, 0.0),
    "PI (0.2, 0.4, 0)": tfaca.PIDController(0.2, 0.4, 0.0),
}


def benchmark_problem(name, controller, reps):
    runner = TfacaRunner(name, "aca", controller=controller)
    reference = TfacaRunner(name, "aca", dtype="float64", rtol=1e-10, atol=1e-12,
                            max_steps=100000)
    runner.fwdbwd()  # traced here
    seconds = _median_time(runner.fwdbwd, reps)
    c = runner.counts()
    error = float(np.max(np.abs(runner.fwd() - reference.fwd())))
    return dict(steps=c["steps"], rejected=c["rejected"], fevals=c["nfe_fwd"], ms=1e3 * seconds,
                error=error)


def benchmark_van_der_pol(mu, controller, reps):
    def field(t, y):
        return tf.stack([y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], axis=-1)

    y0 = tf.Variable([[2.0, 0.0], [1.0, 1.0]], dtype=tf.float64)

    def solve(rtol, controller):
        return tfaca.solve(field, y0, [0.0, 3.0 * mu], rtol=rtol, atol=rtol * 1e-3,
                           controller=controller, max_steps=200000)

    @tf.function
    def fwdbwd():
        with tf.GradientTape() as tape:
            sol = solve(1e-5, controller)
            loss = tf.reduce_sum(sol.ys[-1] ** 2)
        return sol, tape.gradient(loss, y0)

    reference = tf.function(lambda: solve(1e-10, None).ys[-1])()
    sol, _ = fwdbwd()
    seconds = _median_time(lambda: fwdbwd()[1].numpy(), reps)
    return dict(steps=int(sol.stats.num_steps), rejected=int(sol.stats.num_rejected),
                fevals=int(sol.stats.num_fevals), ms=1e3 * seconds,
                error=float(np.max(np.abs(sol.ys[-1] - reference))))


SWITCHES = np.arange(1.0, 10.0)


def benchmark_switched(jumps, reps):
    """dy/dt = A y + b u(t) on a 64-dimensional state (batch 16), u = +1 / -1 switching
    at each of SWITCHES, from 0 to 10."""
    rng = np.random.default_rng(0)
    n = 64
    A = -np.eye(n) + 0.3 * rng.normal(size=(n, n)) / np.sqrt(n)
    b = rng.normal(size=n)
    y0 = rng.normal(size=(16, n))
    level = lambda t: 1.0 - 2.0 * (np.searchsorted(SWITCHES, t, side="right") % 2)  # noqa: E731
    # Exact: on each piece, y(t) = e^{A(t-s)} (y(s) + A^-1 b u) - A^-1 b u.
    import scipy.linalg
    edges = np.r_[0.0, SWITCHES, 10.0]
    y_exact = y0.copy()
    Ainv_b = np.linalg.solve(A, b)
    for s0, s1 in zip(edges[:-1], edges[1:]):
        u = level(s0)
        y_exact = (y_exact + Ainv_b * u) @ scipy.linalg.expm(A * (s1 - s0)).T - Ainv_b * u

    A_t, b_t = tf.Variable(A), tf.constant(b)
    switches = tf.constant(SWITCHES)
    y0_t = tf.constant(y0)

    def field(t, y):
        u = 1.0 - 2.0 * tf.cast(tf.math.floormod(
            tf.reduce_sum(tf.cast(switches <= t, tf.int32)), 2), tf.float64)
        return y @ tf.transpose(A_t) + b_t * u

    @tf.function
    def fwdbwd():
        with tf.GradientTape() as tape:
            sol = tfaca.solve(field, y0_t, [0.0, 10.0], rtol=1e-6, atol=1e-9, max_steps=20000,
                              jump_ts=SWITCHES if jumps else None)
            loss = tf.reduce_sum(sol.ys[-1] ** 2)
        return sol, tape.gradient(loss, A_t)

    sol, _ = fwdbwd()
    seconds = _median_time(lambda: fwdbwd()[1].numpy(), reps)
    return dict(steps=int(sol.stats.num_steps), rejected=int(sol.stats.num_rejected),
                fevals=int(sol.stats.num_fevals), ms=1e3 * seconds,
                error=float(np.max(np.abs(sol.ys[-1].numpy() - y_exact))))


def benchmark_norm(norm, dtype, rtol, reps):
    kwargs = {} if rtol is None else dict(rtol=rtol, atol=rtol * 1e-2, max_steps=100000)
    runner = TfacaRunner("mlp", "adjoint", dtype=dtype, norm=norm, **kwargs)
    reference = TfacaRunner("mlp", "aca", dtype="float64", rtol=1e-10, atol=1e-12,
                            max_steps=100000)
    _, grads = runner.fwdbwd()
    seconds = _median_time(runner.fwdbwd, reps)
    _, exact = reference.fwdbwd()
    got = np.concatenate([g.ravel() for g in grads[1:]])
    want = np.concatenate([g.ravel() for g in exact[1:]])
    c = runner.counts()
    stats = runner.strategy.backward_stats
    return dict(steps=int(stats.num_steps), rejected=int(stats.num_rejected),
                fevals=c["nfe_bwd"], ms=1e3 * seconds,
                error=float(np.max(np.abs(got - want)) / np.max(np.abs(want))),
                tolerance=runner.tolerances[0])


def benchmark_norm_small(norm, rtol, reps):
    """A small MLP field (4-32-4, tanh, float64) from one sample to t = 5: the parameters'
    adjoint (288 weights) against a state and adjoint of 4 each."""
    rng = np.random.default_rng(0)
    w1 = tf.Variable(rng.normal(size=(4, 32)) * 0.6)
    w2 = tf.Variable(rng.normal(size=(32, 4)) * 0.6 / np.sqrt(2.0))
    b1 = tf.Variable(np.zeros(32))
    y0 = tf.constant(rng.normal(size=(1, 4)))

    def grads(gradient, rtol):
        @tf.function
        def run():
            with tf.GradientTape() as tape:
                ys = tfaca.odeint(lambda t, y: tf.tanh(y @ w1 + b1) @ w2, y0, [0.0, 5.0],
                                  gradient=gradient, rtol=rtol, atol=rtol * 1e-2,
                                  max_steps=100000)
                loss = tf.reduce_sum(ys[-1] ** 2)
            return tape.gradient(loss, [w1, b1, w2])
        return run

    strategy = tfaca.AdjointGradient(norm=norm)
    run = grads(strategy, rtol)
    got = np.concatenate([g.numpy().ravel() for g in run()])
    seconds = _median_time(lambda: run()[0].numpy(), reps)
    want = np.concatenate([g.numpy().ravel() for g in grads("aca", 1e-11)()])
    stats = strategy.backward_stats
    return dict(steps=int(stats.num_steps), rejected=int(stats.num_rejected),
                fevals=int(stats.num_fevals), ms=1e3 * seconds,
                error=float(np.max(np.abs(got - want)) / np.max(np.abs(want))), tolerance=rtol)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 10")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                      "step_control.md"))
    args = parser.parse_args()
    reps = 3 if args.quick else 10
    rows = []
    started = time.time()
    cases = [(p, lambda c, p=p: benchmark_problem(p, c, reps)) for p in ("mlp", "conv", "threebody")]
    cases += [(f"van der pol, mu={mu}", lambda c, mu=mu: benchmark_van_der_pol(mu, c, reps))
              for mu in (10.0, 100.0)]
    for problem, run in cases:
        for name, controller in CONTROLLERS.items():
            r = run(controller)
            rows.append((problem, name, r))
            print(problem, name, r, flush=True)
    lines = [
        "# PID against integral step-size control",
        "",
        f"`python benchmarks/step_control.py{' --quick' if args.quick else ''}` "
        f"({reps} repetitions, {time.time() - started:.0f} s, 1 process on "
        f"{os.cpu_count()} cores, TensorFlow {tf.__version__}). tfaca's default mode: Dopri5, "
        "ACA, a plain `tf.function`; time is the median forward+backward call; the error is "
        "max |y(T) - y_ref(T)| against a float64 solve at rtol 1e-10.",
        "",
        "| problem | controller | steps | rejected | forward evaluations | ms (fwd+bwd) | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for problem, name, r in rows:
        lines.append(f"| {problem} | {name} | {r['steps']} | {r['rejected']} | {r['fevals']} | "
                     f"{r['ms']:.1f} | {r['error']:.1e} |")
    lines += [
        "", "## Jump times: a switched input", "",
        "A 64-dimensional linear system (batch 16, float64, rtol 1e-6, atol 1e-9) driven by "
        f"an input that switches sign at t = {', '.join(f'{t:g}' for t in SWITCHES)}; ACA, "
        "a plain `tf.function`; the error is max |y(10) - exact| (matrix exponentials per "
        "piece).", "",
        "| jump_ts | steps | rejected | forward evaluations | ms (fwd+bwd) | error |",
        "|---|---|---|---|---|---|",
    ]
    for jumps in (False, True):
        r = benchmark_switched(jumps, reps)
        print("switched", jumps, r, flush=True)
        lines.append(f"| {'the switch times' if jumps else 'none'} | {r['steps']} | "
                     f"{r['rejected']} | {r['fevals']} | {r['ms']:.1f} | {r['error']:.1e} |")
    lines += [
        "", "## The adjoint's seminorm", "",
        "The MLP problem's gradient by the continuous adjoint, whose reverse solve's error "
        "norm covers `[y, a, dL/dθ]` (`AdjointGradient()`) or `[y, a]` only "
        "(`AdjointGradient(norm=\"seminorm\")`, Kidger, Chen & Lyons 2021). Reverse counts "
        "from `AdjointGradient.backward_stats`; the error is the weights' gradient against "
        "ACA's in float64 at rtol 1e-10 (1e-11 for the small MLP), relative to its largest "
        "entry. The MLP problem: 32-128-32, batch 128 (state and adjoint 4,096 elements "
        "each, 8,352 weights); the small MLP: 4-32-4 (tanh), one sample, t from 0 to 5 (4 "
        "elements each, 288 weights).", "",
        "| problem | rtol | norm | reverse steps | rejected | reverse evaluations | "
        "ms (fwd+bwd) | gradient error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cases = [(f"MLP problem, {dtype}", lambda norm, d=dtype, r=rtol: benchmark_norm(norm, d, r, reps))
             for dtype, rtol in (("float32", None), ("float64", 1e-6), ("float64", 1e-8))]
    cases += [("small MLP, one sample, float64",
               lambda norm, r=rtol: benchmark_norm_small(norm, r, reps)) for rtol in (1e-6, 1e-8)]
    for problem, run in cases:
        for norm in ("full", "seminorm"):
            r = run(norm)
            print("norm", problem, norm, r, flush=True)
            lines.append(f"| {problem} | {r['tolerance']:g} | {norm} | {r['steps']} | "
                         f"{r['rejected']} | {r['fevals']} | {r['ms']:.1f} | {r['error']:.1e} |")
    write_report(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

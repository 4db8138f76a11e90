"""PID against integral step-size control (issue 31): rejected trials, steps and time.

    python benchmarks/step_control.py [--quick] [--out benchmarks/step_control.md]

For each problem, tfaca's default mode (Dopri5, ACA, a plain `tf.function`) with the
integral controller (the default, `controller=None`) and two of Söderlind's PI controllers,
`PIDController(0.4, 0.3, 0)` (diffrax's suggestion) and `(0.2, 0.4, 0)`: accepted steps,
rejected trials, forward evaluations, the median time of a forward+backward call, and the
error of y(T) against a float64 solve at rtol 1e-10. The problems are the benchmark
problems (`problems.py`: MLP, conv, three-body, float32 at their tolerances) and two
mildly stiff Van der Pol oscillators (mu = 10 and 100, float64, rtol 1e-5), where the
integral controller's step size oscillates at Dopri5's stability boundary.
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
    write_report(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Shared test problems and reference computations."""

import numpy as np
import scipy.linalg
import tensorflow as tf

ADAPTIVE = ["heun_euler", "bosh3", "dopri5", "tsit5"]
FIXED = ["euler", "midpoint", "rk4"]
ORDERS = {"euler": 1, "midpoint": 2, "rk4": 4, "heun_euler": 2, "bosh3": 3, "dopri5": 5, "tsit5": 5}

# A damped rotation: smooth, non-stiff, with a known exponential solution.
A_NP = np.array([[-0.1, 1.0, 0.0], [-1.0, -0.1, 0.2], [0.0, -0.3, -0.5]])


def linear_func(A):
    A = tf.constant(A)
    return lambda t, y: tf.linalg.matvec(A, y)


def expm_solution(A, y0, t):
    return scipy.linalg.expm(A * t) @ y0


def frechet_expm(A, E):
    """Fréchet derivative of expm at A in direction E."""
    return scipy.linalg.expm_frechet(A, E, compute_expm=False)

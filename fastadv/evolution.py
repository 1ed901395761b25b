"""Differential evolution, drawing numpy's random numbers in torchattacks' order.

torchattacks' OnePixel runs its own copy of an old scipy solver (strategy best1bin,
random init, dithered mutation, the whole population evaluated at once, no
polishing). scipy's public differential_evolution draws in another order (its
mutation, crossover and selection were rewritten since), so it cannot reproduce
those draws: this module does, with the arithmetic vectorized over the population
and only the random calls kept one candidate at a time.
"""
import numpy as np


def differential_evolution(energies, bounds, *, maxiter, popmul, stop, mutation=(0.5, 1.0), recombination=1.0,
                           rng=np.random):
    """Minimize energies over a box; returns the best parameters found, shape [P].

    energies(params [M, P] float64) -> [M] numbers, lower is better.
    bounds: P (low, high) pairs. maxiter: generations. popmul: population size per
    parameter (M = max(5, popmul * P)). stop(best [P], changed) -> bool is asked after
    every generation, with changed False when the best member is the one it was last
    asked about; True ends the search. rng: a numpy RandomState or the np.random
    module (its global RandomState, as the reference's seed=None).
    The reference's convergence test (atol=-1, tol=0.01 on energies in [0, 1]) can
    never pass, so only maxiter and stop end the search.
    """
    limits = np.array(bounds, dtype=float).T
    centre, width = 0.5 * (limits[0] + limits[1]), np.fabs(limits[0] - limits[1])
    n_params = limits.shape[1]
    size = max(5, popmul * n_params)

    def scaled(members):
        return centre + (members - 0.5) * width

    population = rng.random_sample((size, n_params))
    energy = np.asarray(energies(scaled(population))).reshape(size)
    first = int(np.argmin(energy))
    energy[[0, first]] = energy[[first, 0]]
    population[[0, first]] = population[[first, 0]]

    low, high = sorted(mutation)
    changed = True
    for _ in range(maxiter):
        scale = rng.rand() * (high - low) + low
        pairs = np.empty((size, 2), dtype=np.intp)
        crossover = np.empty((size, n_params), dtype=bool)
        for c in range(size):
            fill_point = rng.randint(0, n_params)
            others = list(range(size))
            others.remove(c)
            rng.shuffle(others)
            pairs[c] = others[:2]
            crossover[c] = rng.rand(n_params) < recombination
            crossover[c, fill_point] = True
        mutant = population[0] + scale * (population[pairs[:, 0]] - population[pairs[:, 1]])
        trials = np.where(crossover, mutant, population)
        outside = (trials < 0) | (trials > 1)
        trials[outside] = rng.rand(int(outside.sum()))  # row by row, as one rand() per entry
        trial_energy = np.asarray(energies(scaled(trials))).reshape(size)

        best_before = population[0].copy()
        for c in range(size):
            if trial_energy[c] < energy[c]:
                population[c] = trials[c]
                energy[c] = trial_energy[c]
                if trial_energy[c] < energy[0]:
                    energy[0] = trial_energy[c]
                    population[0] = trials[c]
        changed = changed or not np.array_equal(best_before, population[0])
        if stop(scaled(population[0]), changed):
            break
        changed = False
    return scaled(population[0])

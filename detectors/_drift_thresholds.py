"""CUSUM thresholds of the default drift settings, made by bench/drift_threshold_table.py.

Keys: (digest of the null pool, steps of the horizon, alpha, tau, seed), the arguments of
``detectors.drift._calibrated_threshold``; values: what it returns for them. Do not edit:
rerun the script when the simulation or the default settings change
(tests/detectors/test_drift.py recomputes every entry).
"""

THRESHOLDS: dict[tuple[str, int, float, float, int], float] = {
    ('8cddf1a0be7fdf40', 2000, 0.001, 0.055, 0): 6.666774272918701,
    ('8cddf1a0be7fdf40', 2000, 0.001, 0.06, 0): 6.722807884216309,
    ('8cddf1a0be7fdf40', 2000, 0.001, 0.065, 0): 6.7948408126831055,
    ('8cddf1a0be7fdf40', 2000, 0.001, 0.07, 0): 6.817438125610352,
    ('8cddf1a0be7fdf40', 2000, 0.001, 0.075, 0): 6.876150608062744,
    ('8cddf1a0be7fdf40', 2000, 0.001, 0.08, 0): 6.915615558624268,
    ('8cddf1a0be7fdf40', 2000, 0.001, 0.085, 0): 6.967325687408447,
    ('8cddf1a0be7fdf40', 2000, 0.001, 0.09, 0): 6.988608360290527,
    ('8cddf1a0be7fdf40', 2000, 0.001, 0.095, 0): 7.009890556335449,
    ('8cddf1a0be7fdf40', 2000, 0.001, 0.1, 0): 7.139960289001465,
    ('8cddf1a0be7fdf40', 2000, 0.001, 0.105, 0): 7.276379585266113,
    ('8cddf1a0be7fdf40', 2000, 0.001, 0.11, 0): 7.364140033721924,
    ('8cddf1a0be7fdf40', 2000, 0.001, 0.115, 0): 7.395691394805908,
}

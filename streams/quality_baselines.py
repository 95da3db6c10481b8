"""The detectors a user would otherwise pick, run on the bench's own streams.

- river ``HalfSpaceTrees``, streaming: each row is scored, then learnt, in
  stream order, behind a ``MinMaxScaler`` (HST assumes features in [0, 1]; river's
  documentation puts the scaler in front, as a user would).
- PyOD ``KNN`` (k=5, largest distance, as ADBench ran it) and ``IForest``
  (PyOD defaults), fitted in batch on the whole stream: an offline reference
  that sees every row, the future and the anomalies included, which a stream
  never can.

river and PyOD are touched from this module only. PyOD is a dev extra:
importing it lazily keeps ``nwatch`` itself free of it.
"""

from __future__ import annotations

import numpy as np


def half_space_trees(X: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Streaming HST scores (score one, then learn one), higher = more anomalous."""
    from river import anomaly, preprocessing

    model = preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(seed=seed)
    names = [f"f{j}" for j in range(X.shape[1])]
    out = np.empty(len(X))
    for i, row in enumerate(X):
        x = dict(zip(names, map(float, row)))
        out[i] = model.score_one(x)
        model.learn_one(x)
    return out


def pyod_knn(X: np.ndarray) -> np.ndarray:
    """PyOD KNN (n_neighbors=5, method="largest") fitted on all rows; its training scores."""
    from pyod.models.knn import KNN

    model = KNN(n_neighbors=5, method="largest")
    model.fit(X)
    return np.asarray(model.decision_scores_, dtype=np.float64)


def pyod_iforest(X: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """PyOD IForest (defaults, fixed seed) fitted on all rows; its training scores."""
    from pyod.models.iforest import IForest

    model = IForest(random_state=seed)
    model.fit(X)
    return np.asarray(model.decision_scores_, dtype=np.float64)


BASELINES = {
    "HST": half_space_trees,
    "PyOD KNN": lambda X, seed=0: pyod_knn(X),
    "PyOD IForest": pyod_iforest,
}

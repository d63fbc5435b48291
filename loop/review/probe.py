"""A linear probe on cached features, as a scikit-learn pipeline: the head that selection and the audit refit.

Why not `loop.model.head`: that one fits *the network's* classifier for a model version (C by group k-fold,
folded into torch weights); selection and the audit refit a head many times a minute on arrays, and need
only probabilities. Same recipe (StandardScaler + multinomial logistic regression on image + mirror rows).
Caveat: C is fixed by the caller (1.0 by default), not tuned: a fit must take well under a second.
"""

from __future__ import annotations

import numpy as np


def fit_probe(x: np.ndarray, y: np.ndarray, *, c: float = 1.0):
    """StandardScaler + multinomial LogisticRegression on (N, F) features: the head, as a sklearn pipeline.

    Rows may be (image, mirror) pairs flattened; callers keep a pair on one side of any split.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # tiny fits: multi-threaded BLAS only adds contention (see loop.model.head)
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x, y)


def probe_probs(model, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, n_classes) probabilities of a `fit_probe` model; classes it never saw get probability 0."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        p = model.predict_proba(x)
    out = np.zeros((len(x), n_classes))
    out[:, model.classes_] = p
    return out

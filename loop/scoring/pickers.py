"""Pickers: turn scores and embeddings into an ordered batch of photos for a reviewer.

Scores (`loop.scoring.strategies`) say how much one photo is worth a look; a picker decides which *set* of photos to
show, so that a batch is not twenty views of the same confusing chair. All functions are pure numpy /
scikit-learn over arrays: `embeddings` (N, F) are the backbone's cached features (any scale; they are
standardised and reduced here), `scores` (N,) are higher = more worth a look, and every picker returns
indices into the N rows, most useful first.

Caveat: diversity is measured in the frozen backbone's feature space, which groups photos by look
(colour, background, viewpoint), not by what a reviewer would call "the same item". Near-duplicates are
close there, which is what matters; two different items of one look may count as redundant.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

EMBED_DIMS = 32  # PCA dimensions of the space where distances are measured (noise dims hurt k-means)
TYPICALITY_NEIGHBOURS = 20  # TypiClust's k for typicality = 1 / mean distance to the k nearest neighbours
MAX_COLD_CLUSTERS = 500  # cap on k-means clusters at cold start (cost grows with it)


def embed_space(embeddings: np.ndarray, *, dims: int = EMBED_DIMS) -> np.ndarray:
    """Standardise, PCA to `dims`, L2-normalise: (N, F) -> (N, min(dims, N, F)) for distance-based picking."""
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must have shape (N, F), got {x.shape}")
    if len(x) == 0:
        return np.zeros((0, 0))
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    n_comp = min(dims, x.shape[0], x.shape[1])
    if n_comp >= 2:
        with threadpool_limits(1):
            x = PCA(n_components=n_comp, svd_solver="randomized" if n_comp < min(x.shape) // 2 else "full",
                    random_state=0).fit_transform(x)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def _kmeans(x: np.ndarray, n_clusters: int, *, seed: int,
            weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cluster label per row, centres); MiniBatchKMeans above a few thousand rows (same answer, faster)."""
    import warnings

    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    n_clusters = max(1, min(n_clusters, len(x)))
    if len(x) > 5000:
        km = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, n_init=3, batch_size=2048)
    else:
        km = KMeans(n_clusters=n_clusters, random_state=seed, n_init=1)
    # One thread: these are small problems, and OpenMP spinning on a busy 2-core machine costs seconds.
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicates: fewer distinct clusters is fine
        km.fit(x, sample_weight=weights)
    return km.labels_, km.cluster_centers_


def typicality(x: np.ndarray, *, neighbours: int = TYPICALITY_NEIGHBOURS) -> np.ndarray:
    """1 / mean distance to the nearest `neighbours` other rows: (N, F) -> (N,); higher = more typical."""
    from sklearn.neighbors import NearestNeighbors

    n = len(x)
    if n <= 1:
        return np.ones(n)
    k = min(neighbours, n - 1)
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)  # column 0: the row itself
    return 1.0 / (dist[:, 1:].mean(axis=1) + 1e-12)


def typiclust(embeddings: np.ndarray, labeled_embeddings: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """TypiClust (Hacohen et al., 2022): the most typical photo of each of the largest uncovered clusters.

    k-means splits labeled + candidate photos into (labeled + k) clusters; clusters holding no labeled photo
    are "uncovered"; from the largest uncovered clusters first, the candidate with the highest typicality
    (density among its cluster) is picked. Used at cold start, when uncertainty is not yet meaningful.

    Args:
        embeddings: (N, F) candidates. labeled_embeddings: (M, F) photos already labeled (M may be 0).
    Returns:
        up to k indices into `embeddings`, most representative first.
    """
    n, m = len(embeddings), len(labeled_embeddings)
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    both = np.concatenate([embeddings, labeled_embeddings]) if m else np.asarray(embeddings)
    x = embed_space(both)
    n_clusters = min(m + k, MAX_COLD_CLUSTERS, len(x))
    assign, _ = _kmeans(x, n_clusters, seed=seed)
    covered = set(assign[n:].tolist())
    sizes = np.bincount(assign, minlength=n_clusters)
    # Per cluster: its candidates, most typical first. Typicality is measured over all photos in one k-NN
    # pass (TypiClust measures it within the cluster; with k=20 neighbours the two mostly agree, and one
    # pass instead of one per cluster is what keeps hundreds of clusters cheap).
    typ = typicality(x)
    ranked: dict[int, list[int]] = {}
    for c in range(n_clusters):
        members = np.flatnonzero(assign == c)
        ranked[c] = [int(j) for j in members[np.argsort(-typ[members], kind="stable")] if j < n]
    # Largest uncovered clusters first; when k exceeds them, further rounds over all clusters by size.
    order = sorted(range(n_clusters), key=lambda c: (c in covered, -sizes[c], c))
    picks: list[int] = []
    depth = 0
    while len(picks) < min(k, n):
        for c in order:
            if depth < len(ranked[c]):
                picks.append(ranked[c][depth])
                if len(picks) == min(k, n):
                    break
        depth += 1
    return np.asarray(picks, dtype=np.int64)


def diverse_top(
    scores: np.ndarray,
    embeddings: np.ndarray,
    k: int,
    *,
    pred: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    candidates_per_pick: int = 10,
    seed: int = 0,
) -> np.ndarray:
    """Uncertain, diverse and class-balanced: cluster the most uncertain candidates, best of each cluster.

    1. Class balance: candidates are the top-scoring photos *of each predicted class*, each class's quota
       shared out so that classes with fewer labels get more (a class the model rarely sees is where its
       probabilities are least trustworthy).
    2. Diversity: weighted k-means (weights = scores) splits the candidates into k clusters; a batch takes
       the highest-scoring photo of each cluster, so two near-duplicates never both make the batch
       (Zhdanov 2019, "Diverse mini-batch active learning"; cluster-margin, Citovsky et al. 2021).
    3. Coverage: while k allows, every predicted class among the candidates gets at least one pick.

    Args:
        scores: (N,) higher = more worth a look. embeddings: (N, F).
        pred: (N,) predicted class index per candidate (None = no class balance).
        labels: (M,) class index of each labeled photo (for the quotas; None = equal quotas).
        candidates_per_pick: how many candidates per batch slot go into the clustering.
    Returns:
        up to k indices, highest score first.
    """
    s = np.asarray(scores, dtype=np.float64)
    n = len(s)
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.argsort(-s, kind="stable")
    pool_size = min(n, max(k, candidates_per_pick * k))
    cand = _balanced_candidates(s, pool_size, pred, labels)
    x = embed_space(embeddings)[cand]
    assign, centres = _kmeans(x, k, seed=seed, weights=s[cand] + 1e-6)
    picks = []
    for c in range(centres.shape[0]):
        members = cand[assign == c]
        if len(members):
            picks.append(members[np.argmax(s[members])])
    picks = np.asarray(picks, dtype=np.int64)
    if pred is not None:
        picks = _cover_classes(picks, s, np.asarray(pred), cand)
    picks = picks[np.argsort(-s[picks], kind="stable")]
    if len(picks) < k:  # k-means may leave clusters empty: fill with the best remaining scores
        rest = np.setdiff1d(np.argsort(-s, kind="stable"), picks, assume_unique=True)
        rest = rest[np.argsort(-s[rest], kind="stable")]
        picks = np.concatenate([picks, rest[: k - len(picks)]])
    return picks


def _cover_classes(picks: np.ndarray, s: np.ndarray, pred: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Swap picks so every predicted class among the candidates has one, while the batch has room.

    The lowest-scoring pick of the most represented class makes way for the best candidate of a missing
    class: a confidently predicted class still gets a look (confident is not the same as right).
    """
    picks = picks.copy()
    missing = [c for c in np.unique(pred[cand]) if c not in set(pred[picks].tolist())]
    for c in missing:
        counts = np.bincount(pred[picks], minlength=int(pred.max()) + 1)
        if counts.max() <= 1:
            break  # one pick per class already: no room without losing another class
        crowded = int(np.argmax(counts))
        members = np.flatnonzero(pred[picks] == crowded)
        drop = members[np.argmin(s[picks[members]])]
        of_c = cand[pred[cand] == c]
        picks[drop] = of_c[np.argmax(s[of_c])]
    return picks


def _balanced_candidates(s: np.ndarray, size: int, pred: np.ndarray | None, labels: np.ndarray | None) -> np.ndarray:
    """`size` candidate indices: per predicted class, its top scores; rarer (fewer labels) classes get more."""
    order = np.argsort(-s, kind="stable")
    if pred is None:
        return order[:size]
    pred = np.asarray(pred)
    classes = np.unique(pred)
    counts = np.array([(np.asarray(labels) == c).sum() if labels is not None else 0 for c in classes], float)
    share = 1.0 / np.sqrt(counts + 1.0)
    quota = np.maximum(1, np.floor(size * share / share.sum())).astype(int)
    chosen: list[np.ndarray] = []
    for c, q in zip(classes, quota, strict=True):
        chosen.append(order[pred[order] == c][:q])
    cand = np.unique(np.concatenate(chosen))
    if len(cand) < size:  # classes with few candidates leave room: fill by score
        rest = order[~np.isin(order, cand)]
        cand = np.concatenate([cand, rest[: size - len(cand)]])
    return cand


def badge(probs: np.ndarray, embeddings: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """BADGE (Ash et al., 2020): k-means++ seeding over the loss gradient of the last layer.

    A photo's gradient embedding is (p - onehot(argmax p)) outer its features: long when the model is
    unsure, pointing where it would move the head. k-means++ seeding picks far-apart long vectors, i.e.
    uncertain and diverse at once, with no knob.

    Args:
        probs: (N, K). embeddings: (N, F).
    Returns:
        up to k indices, in seeding order.
    """
    p = np.asarray(probs, dtype=np.float64)
    n = len(p)
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    x = embed_space(embeddings)
    onehot = np.eye(p.shape[1])[p.argmax(axis=1)]
    g = ((p - onehot)[:, :, None] * x[:, None, :]).reshape(n, -1)
    rng = np.random.default_rng(seed)
    picks = [int(np.argmax((g**2).sum(axis=1)))]
    d2 = ((g - g[picks[0]]) ** 2).sum(axis=1)
    while len(picks) < min(k, n):
        if d2.sum() <= 0:
            rest = np.setdiff1d(np.arange(n), picks)
            picks.extend(rng.permutation(rest)[: min(k, n) - len(picks)].tolist())
            break
        nxt = int(rng.choice(n, p=d2 / d2.sum()))
        picks.append(nxt)
        d2 = np.minimum(d2, ((g - g[nxt]) ** 2).sum(axis=1))
    return np.asarray(picks, dtype=np.int64)

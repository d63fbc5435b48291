"""Paired comparisons of two models on the same photos: the statistics behind every gate.

Both models are scored on the same labeled photos; only the *discordant* photos (one model right, the
other wrong) carry evidence about which is better (McNemar). A loss is significant when the exact
one-sided binomial p-value of the losses among the discordant photos is below its Holm-Bonferroni
threshold: every gate runs a *family* of tests (overall on each kind of evidence, and per class), and
testing eleven classes at 0.05 each would refuse a model that is no worse about half the time.
Caveat: photos of one item are not independent; where items have many photos the p-values are optimistic
(refusals come a little easier), never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

OVERALL = "overall"


@dataclass
class Paired:
    """Per-photo outcomes of two models on the same photos: true labels, candidate right, current right.

    `names`: what the reasons call the two (the gate's candidate and deployed model; INT8 and float)."""

    labels: np.ndarray
    candidate: np.ndarray
    current: np.ndarray
    names: tuple[str, str] = ("the candidate", "the current model")

    @property
    def n(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class LossTest:
    """Is the candidate worse than the current model on `what` (OVERALL or a class) of one evidence?

    `gained`: photos only the candidate gets right; `lost`: only the current one; `p`: one-sided exact
    binomial p-value of `lost` among `gained + lost` (1.0 when no photo is discordant). `threshold` and
    `significant` are set by `holm` for the family the test belongs to.
    """

    what: str
    where: str
    n: int
    gained: int
    lost: int
    p: float
    current_accuracy: float | None
    candidate_accuracy: float | None
    threshold: float | None = None
    significant: bool = False
    names: tuple[str, str] = ("the candidate", "the current model")

    def describe(self) -> str:
        """e.g. "chair recall 1.00 -> 0.82 on 11 photos (lost 2, gained 0, one-sided binomial p=0.25 >= 0.0023)"."""
        measure = "accuracy" if self.what == OVERALL else f"{self.what} recall"
        test = "one-sided exact McNemar" if self.what == OVERALL else "one-sided binomial"
        versus = "<" if self.significant else ">="
        holm = f" {versus} Holm threshold {self.threshold:.3g}" if self.threshold is not None else ""
        return (f"{measure} {_fmt(self.current_accuracy)} -> {_fmt(self.candidate_accuracy)} on {self.n} photos "
                f"(right only for {self.names[0]} on {self.gained}, only for {self.names[1]} on {self.lost}; "
                f"{test} p={self.p:.3g}{holm})")


def binomial_p(k: int, n: int, alternative: str = "greater") -> float:
    """Exact binomial p-value of k successes in n fair trials (1.0 when n == 0)."""
    from scipy.stats import binomtest

    return float(binomtest(k, n, 0.5, alternative=alternative).pvalue) if n else 1.0


def loss_test(paired: Paired, where: str, what: str = OVERALL) -> LossTest:
    """The one-sided test "the candidate is worse" on all photos (OVERALL) or on one class's photos."""
    mask = np.ones(paired.n, bool) if what == OVERALL else paired.labels == what
    gained = int((paired.candidate & ~paired.current & mask).sum())
    lost = int((~paired.candidate & paired.current & mask).sum())
    n = int(mask.sum())
    return LossTest(what, where, n, gained, lost, binomial_p(lost, gained + lost),
                    float(paired.current[mask].mean()) if n else None,
                    float(paired.candidate[mask].mean()) if n else None, names=paired.names)


def class_tests(paired: Paired, where: str) -> list[LossTest]:
    """One loss test per class with at least one discordant photo (a class with none cannot show a loss)."""
    tests = [loss_test(paired, where, str(name)) for name in sorted(set(paired.labels.tolist()))]
    return [t for t in tests if t.gained + t.lost]


def holm(tests: list[LossTest], alpha: float) -> list[LossTest]:
    """Holm-Bonferroni over one family: the smallest p against alpha/m, the next against alpha/(m-1), ...

    Controls the chance of refusing a model that is in truth no worse on any of them at `alpha`. Returns
    the tests in the given order, each with its threshold and verdict.
    """
    m = len(tests)
    out = list(tests)
    stopped = False
    for rank, i in enumerate(sorted(range(m), key=lambda j: tests[j].p)):
        threshold = alpha / (m - rank)
        significant = not stopped and tests[i].p < threshold
        stopped = stopped or not significant
        out[i] = replace(tests[i], threshold=threshold, significant=significant)
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"

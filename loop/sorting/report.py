"""What one sort run did (`SortReport`): counts, failures, and the one-paragraph summary a user reads.

Why a module of its own: the pipeline (`loop.sorting.pipeline`), its copier (`loop.sorting.copier`) and both front
ends (`sortloop sort`, the standalone sorter) fill or print it; it needs nothing but the standard library.
Caveat: `registered` stays 0 for the standalone sorter (it has no manifest).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MANY_UNFAMILIAR = 0.2  # a larger share of a run sent to the unfamiliar folder gets a hint in the summary


@dataclass
class SortReport:
    """What one sort run did. `failed` lists (path, reason) for every file that was not sorted."""

    src: str = ""
    dest: str = ""
    model_version: str = ""
    run_id: str = ""
    seen: int = 0
    copied: int = 0
    already_sorted: int = 0
    identical_existing: int = 0  # an identical file already sat at the destination name
    renamed: int = 0  # copied under a unique name because a different file had the name
    flagged: int = 0
    unfamiliar: int = 0  # of the flagged: photos unlike every labeled one, copied to the unfamiliar folder
    registered: int = 0  # new images added to the manifest
    flag_strategy: str = ""  # the strategy the flags used (the options' may be "auto")
    failed: list[tuple[str, str]] = field(default_factory=list)
    per_label: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # Where the time went (`loop.sorting.pipeline.sort_into`): the main process's wall seconds per stage (wait_decode,
    # predict, place, copy_wait, record) and the decode workers' summed seconds (worker_hash, worker_decode,
    # worker_describe: pHash + EXIF time, worker_predict)
    stages: dict[str, float] = field(default_factory=dict)
    left_for_rerun: int = 0  # decoded, but not copied because the disk filled up (a rerun copies them)

    @property
    def ok(self) -> bool:
        """True if every file was sorted (or had been before)."""
        return not self.failed and not self.left_for_rerun

    def summary(self) -> str:
        rate = (self.copied + self.identical_existing) / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"sorted {self.seen} files from {self.src} into {self.dest} with model {self.model_version}: "
            f"{self.copied} copied ({self.renamed} under a new name), {self.identical_existing} already there, "
            f"{self.already_sorted} sorted before, {self.flagged} flagged for review "
            f"({self.flagged - self.unfamiliar} unsure, {self.unfamiliar} unfamiliar), {len(self.failed)} failed "
            f"({self.seconds:.1f} s" + (f", {rate:.1f} images/s)" if rate > 0 else ")"),
        ]
        if self.left_for_rerun:
            lines[0] += f"; stopped with {self.left_for_rerun} not copied yet (disk full)"
        if self.per_label:
            lines.append("  " + ", ".join(f"{k}: {v}" for k, v in sorted(self.per_label.items())))
        placed = self.copied + self.identical_existing
        if placed and self.unfamiliar / placed > MANY_UNFAMILIAR:
            # the day-one case: the labeled set is of another kind than the shop's photos (studio vs workshop)
            lines.append(f"  {self.unfamiliar} of {placed} photos ({self.unfamiliar / placed:.0%}) looked unlike every "
                         "labeled photo and went to the unfamiliar folder; if most of them belong to your categories, "
                         "your photos differ from the labeled ones: review some, and the next model learns them "
                         "(once enough of your photos are labeled, it sizes that folder on them too)")
        if self.failed:
            reasons: dict[str, int] = {}
            for _, reason in self.failed:
                key = reason.split(" (")[0]
                reasons[key] = reasons.get(key, 0) + 1
            lines.append("  failures: " + ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items())))
        return "\n".join(lines)

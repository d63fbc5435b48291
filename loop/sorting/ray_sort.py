"""Sorting on a Ray cluster (the optional extra `sortloop[ray]`), with Ray Data.

Sort (`sortloop sort --ray`): the driver lists the files and drops those already sorted (`loop.sorting.folder`, as
for a local sort); Ray Data `map_batches` sends batches of paths to a pool of actors. Each actor builds one
model session at start from the artifact's bytes, put once in the object store (workers need not see the
workspace), then per batch hashes and decodes the files (`loop.data.decode.decode_chunk`), predicts, and copies
each photo into DEST with `loop.sorting.copies.safe_copy`. The driver gets back, per file, what it needs to record
the copy; it writes the copy records, manifest rows, flags and `_review.csv` itself, once, under the usual
locks. If an actor dies, Ray restarts it and runs its batch again: a copy made before the crash is found
identical at its name and not made twice (the report counts it as "already there"), a batch delivered twice
is recorded once, and temp files the dead copier left are removed at the end.

Ray is imported only inside these functions (and `loop.cluster`'s), so `pip install sortloop` without Ray
still works. Caveat: SRC and DEST must be mounted at the same path on every node (NFS/SMB); copies are
written by the nodes, so beyond a few nodes DEST's bandwidth is the limit.
Results come back in completion order, so with `--flat` two different photos with one name may get their
`name (2)` suffixes the other way round than in a local sort.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loop.cluster import connected, pooled, results
from loop.data.decode import Decoded, decode_chunk
from loop.model.artifact import INT8_FILE, ONNX_FILE, SPEC_FILE, WEIGHTS_FILE, Prediction, load_predictor, read_spec
from loop.sorting import copies

logger = logging.getLogger(__name__)


# --- sort -----------------------------------------------------------------------------------------------


@dataclass
class SortJob:
    """What every sort actor needs besides the model: where copies go and how the tree is laid out."""

    src: str
    dest: str
    keep_tree: bool
    runtime: str
    int8: bool = False  # the gated INT8 ONNX model, when the driver's predictor uses it
    other_folder: str | None = None  # where unfamiliar photos go (None: every photo to its class)


class _SortActor:
    """One model session per actor (built once from the shipped artifact bytes); per batch: hash, decode,
    predict, copy. A file already sorted under a known hash is not copied (the driver records it as seen)."""

    def __init__(self, model: list, job: SortJob) -> None:
        import ray

        files: dict[str, bytes] = ray.get(model[0])
        with tempfile.TemporaryDirectory(prefix="sortloop-model-") as folder:  # sessions load it into memory
            for name, data in files.items():
                (Path(folder) / name).write_bytes(data)
            self.predictor = load_predictor(folder, runtime=job.runtime, threads=1,
                                            precision="int8" if job.int8 else "float")
        self.job = job
        self.src, self.dest = Path(job.src), Path(job.dest)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        predictor, size = self.predictor, self.predictor.image_size
        recs = decode_chunk([Path(p) for p in batch["path"]], size)
        n, k = len(recs), len(predictor.classes)
        probs = np.full((n, k), np.nan, np.float32)
        unfamiliar, unfamiliar_score = np.zeros(n, bool), np.full(n, np.nan, np.float32)
        ok = [i for i, rec in enumerate(recs) if rec.ok]
        if ok:  # the same call, on the same artifact files, as a local sort: the same decisions
            prediction = predictor.predict_with_familiarity(np.stack([recs[i].pixels for i in ok]))
            probs[ok] = prediction.probs
            if prediction.unfamiliar is not None and self.job.other_folder:
                unfamiliar[ok], unfamiliar_score[ok] = prediction.unfamiliar, prediction.unfamiliar_scores
        dest_path, copied, copy_error, copy_errno = [""] * n, np.zeros(n, bool), [""] * n, np.zeros(n, np.int64)
        for i in ok:
            rec = recs[i]
            if rec.image_id in str(batch["known"][i]).split(","):
                continue  # sorted before; the file was only touched
            label = self.job.other_folder if unfamiliar[i] else predictor.classes[int(np.argmax(probs[i]))]
            folder = copies.category_folder(self.dest, label, self.src, rec.path, keep_tree=self.job.keep_tree)
            try:
                final, copied[i] = copies.safe_copy(rec.path, folder, rec.path.name, image_id=rec.image_id or "",
                                                    size=rec.size_bytes, mtime_ns=rec.mtime_ns, sync_dir=False,
                                                    root=self.dest)
                dest_path[i] = str(final)
            except OSError as exc:  # includes SourceChanged; reported per file by the driver (a full disk
                copy_error[i], copy_errno[i] = str(exc.strerror or exc), exc.errno or 0  # stops the run there)
        return {
            "path": np.array([str(r.path) for r in recs], dtype=object),
            "image_id": np.array([r.image_id or "" for r in recs], dtype=object),
            "phash": np.array([r.phash or "" for r in recs], dtype=object),
            "taken_raw": np.array([r.taken_raw or "" for r in recs], dtype=object),
            "size": np.array([r.size_bytes for r in recs], np.int64),
            "mtime_ns": np.array([r.mtime_ns for r in recs], np.int64),
            "error": np.array([r.error or "" for r in recs], dtype=object),
            "probs": probs,
            "unfamiliar": unfamiliar,
            "unfamiliar_score": unfamiliar_score,
            "dest_path": np.array(dest_path, dtype=object),
            "copied": copied,
            "copy_error": np.array(copy_error, dtype=object),
            "copy_errno": copy_errno,
        }


Placed = tuple[Path, bool] | OSError | None  # (final path, copied?), a failed copy, or not copied (touched)


def sort_batches(
    paths: Sequence[Path],
    known: dict[str, list[str]],
    model_dir: Path,
    *,
    src: Path,
    dest: Path,
    keep_tree: bool,
    runtime: str = "onnx",
    int8: bool = False,
    other_folder: str | None = None,
    batch_size: int = 32,
    address: str = "",
    actors: int = 0,
) -> Iterator[tuple[list[Decoded], Prediction, list[Placed]]]:
    """Decode, predict and copy `paths` on Ray; yields (records, prediction, placed) per finished batch.

    Args:
        paths: the files to sort (listed by the driver; already-sorted ones left out).
        known: source path -> image_ids it was sorted with before (not copied again if unchanged).
        model_dir: the artifact folder (its bytes are shipped; workers need not see the workspace).
        int8: use the gated INT8 ONNX model, as the driver's `Predictor.int8` says (same results as local).
        other_folder: where photos the model's unfamiliar score rejects go (None: to their class, as before).
    Yields:
        Records in completion order: failed ones carry `error` (their probs are NaN, placed None); placed
        is where the worker's copy landed, the copy's OSError, or None for a file sorted before.
    """
    if not paths:
        return
    with connected(address):
        import ray
        import ray.data

        names = [SPEC_FILE, (INT8_FILE if int8 else ONNX_FILE) if runtime == "onnx" else WEIGHTS_FILE]
        reference = (read_spec(model_dir).get("unfamiliar") or {}).get("file")
        names += [reference] if reference else []
        model = ray.put({name: (model_dir / name).read_bytes() for name in names})
        rows = [{"path": str(p), "known": ",".join(known.get(str(p), []))} for p in paths]
        job = SortJob(str(src), str(dest), keep_tree, runtime, int8, other_folder)
        dataset = pooled(rows, _SortActor, {"model": [model], "job": job}, batch_size, actors)
        placed_folders: set[Path] = set()
        seen: set[Path] = set()  # a batch re-run after a crash must not be recorded twice, however Ray delivers it
        for out in results(dataset, "sort"):
            recs, placed = _unpack(out)
            fresh = [i for i, rec in enumerate(recs) if rec.path not in seen]
            for i in fresh:
                seen.add(recs[i].path)
                if isinstance(placed[i], tuple):
                    placed_folders.add(placed[i][0].parent)
            scored = other_folder is not None and bool(np.isfinite(out["unfamiliar_score"]).any())
            prediction = Prediction(np.asarray(out["probs"], np.float32)[fresh],
                                    np.asarray(out["unfamiliar_score"], np.float32)[fresh] if scored else None,
                                    np.asarray(out["unfamiliar"], bool)[fresh] if scored else None)
            yield [recs[i] for i in fresh], prediction, [placed[i] for i in fresh]
        # An actor killed mid-copy leaves its temp file; its batch was re-run, so the copy itself is there.
        removed = sum(copies.remove_orphan_temps(folder) for folder in placed_folders)
        if removed:
            logger.warning("removed %d temp files left by Ray workers that died mid-copy", removed)


def _unpack(out: dict[str, np.ndarray]) -> tuple[list[Decoded], list[Placed]]:
    recs: list[Decoded] = []
    placed: list[Placed] = []
    for i, path in enumerate(out["path"]):
        rec = Decoded(path=Path(path), image_id=out["image_id"][i] or None, phash=out["phash"][i] or None,
                      taken_raw=out["taken_raw"][i] or None, size_bytes=int(out["size"][i]),
                      mtime_ns=int(out["mtime_ns"][i]), error=out["error"][i] or None)
        recs.append(rec)
        if out["copy_error"][i]:
            code = int(out["copy_errno"][i])
            placed.append(OSError(code, out["copy_error"][i]) if code else OSError(out["copy_error"][i]))
        elif out["dest_path"][i]:
            placed.append((Path(out["dest_path"][i]), bool(out["copied"][i])))
        else:
            placed.append(None)
    return recs, placed

"""Training: labeled manifest rows -> a candidate model version in the registry (never deployed here).

Read `train` top to bottom; each phase says why it is there. Two modes:

- "head" (default): a linear head on frozen, cached body features (image + mirror), StandardScaler +
  LogisticRegression with C chosen by group k-fold over item groups, then *folded into the network's own
  classifier layer*, so the artifact is a plain timm network like any other. Measured on ~400 real photos:
  as accurate as the best fine-tuning (0.70-0.73 on unseen items) and ~100x cheaper to retrain.
- "finetune" (`loop.model.finetune`): a fastai Learner over the SAME timm network, its classifier started from
  the head mode's linear probe: one-cycle `fine_tune`, fastai's default augmentations, body BatchNorm kept
  in eval mode and `train_bn=False` (letting the pretrained BatchNorm statistics move cost ~0.15 accuracy
  on this kind of data). fastai is imported only on this path.

Which labels train (design "gate set + cross-validation"): every label trains the deployed model except
a small, stable **gate set** (`split.user_valid_fraction`, 20% of the user's ingested items; reviews and
user moves always train, see `loop.data.splits`). Metrics, the calibration temperature and the flag curves come
from item-grouped k-fold cross-validation over the training labels (out-of-fold predictions: each photo
scored by a model that never saw its item); the model that ships is then refit on all of them. The gate
(`loop.learning.gate`) compares candidate and deployed model on the gate set, which neither trained on, and
on the labels that arrived since the deployed model (it as it is, the candidate out of fold): those are
the shop's own photos, unlike what was ingested first. They are few per round and biased towards the
model's doubts, so they refuse only on a significant loss, and the gate set stays as the guard against
forgetting. With too few items per class for a gate set, both versions' out-of-fold predictions on the
same labeled photos stand in for it.

Both read images from the resized cache; the promotion gate (`loop.learning.gate`) decides which model ships.
`train` refuses to make a version identical to the newest one (same labels, same recipe).
Caveat: classes are the sorted labels present in the TRAIN split; a label seen only in the gate set
cannot be learned (it is logged, and counts as errors in the metrics).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from loop.data import manifest
from loop.data.classnames import OTHER_LABEL, class_name_problem, twin_problem
from loop.data.label_sources import labeled_after_sorting
from loop.data.resized import ensure_resized, has_resized, load_resized
from loop.errors import ModelError
from loop.learning import registry
from loop.model.artifact import INT8_WEIGHT_BITS, check_artifact, read_spec, save_artifact
from loop.model.backbones import create_network, get_backbone, weights_tag
from loop.model.estimates import class_indices, describe_learning, learning_estimates, oof_frame
from loop.model.evaluate import confusion_png, metrics_by_source, summary_line
from loop.model.head import backbone_cv_accuracy, fit_head
from loop.model.self_training import sorted_unlabeled_rows
from loop.phases import PhaseClock
from loop.progress import ProgressCallback, no_progress
from loop.scoring.unfamiliar import fit_familiarity, save_familiarity
from loop.workspace import Workspace

logger = logging.getLogger(__name__)

TRAINING_SET_FILE = "training_set.parquet"
MODES = ("head", "finetune")


@dataclass
class TrainResult:
    """What `train` produced: a candidate version (not deployed), its mode and its metrics.

    `unchanged` means nothing that trains differed from the newest version's data and recipe: no new
    version was written, and `version` names that existing one.
    """

    version: str
    mode: str
    metrics: dict
    model_dir: Path
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_trained: int = 0
    n_new: int | None = None  # labels the deployed model did not train on (None: unknown for an old model)
    unchanged: bool = False
    notes: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per phase (loop.phases)

    def summary(self) -> str:
        if self.unchanged:
            return (f"nothing to train: the labels and settings are those {self.version} was trained on "
                    f"({self.n_trained} training labels); no identical version made (use --force to retrain)")
        new = "unknown" if self.n_new is None else str(self.n_new)
        lines = [f"trained candidate {self.version} ({self.mode} mode, {self.seconds:.0f} s) on {self.n_trained} "
                 f"labels ({new} new since the deployed model): {summary_line(self.metrics)}"]
        return "\n".join(lines + [f"  {note}" for note in self.notes])


def labeled_rows(ws: Workspace, *, none_of_these: bool = False, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Manifest rows that can train or validate: a label and a split (train/valid).

    "None of these" (OTHER) rows are out-of-scope evidence, not a class: left out unless `none_of_these`
    (training takes them for the unfamiliar score, and they count in the labels' fingerprint). `df`: the
    manifest when the caller has already loaded it."""
    df = manifest.load(ws) if df is None else df
    keep = df["label"].notna() & df["split"].isin(["train", "valid"])
    if not none_of_these:
        keep &= df["label"] != OTHER_LABEL
    return df.loc[keep].reset_index(drop=True)


def labels_fingerprint(df: pd.DataFrame) -> str:
    """A short hash of (image_id, label, split) over labeled rows: equal fingerprints = same training data."""
    rows = df.loc[df["label"].notna(), ["image_id", "label", "split"]].astype(str)
    text = "\n".join(sorted("\t".join(r) for r in rows.itertuples(index=False, name=None)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recipe(ws: Workspace, mode: str, backbone: str, pretrained: bool) -> dict:
    """The settings that change what training produces from the same labels (kept in model.json).

    The INT8 model's format is part of it: a version quantised with other weight bits (an older sortloop's
    8-bit INT8 sorts in float now, `loop.model.artifact.int8_passed`) is retrained by the next nightly run,
    new labels or not, instead of sorting slower until labels arrive."""
    m = ws.settings.model
    out = {"mode": mode, "backbone": backbone, "image_size": m.image_size, "pretrained": pretrained,
           "seed": m.seed, "cv_folds": m.cv_folds, "calibrate": m.calibrate, "self_training": m.self_training,
           "backbone_weights_file": str(m.backbone_weights_file or ""),
           "backbone_candidates": list(m.backbone_candidates),
           "int8_weight_bits": INT8_WEIGHT_BITS if m.int8 else None}
    if mode == "finetune":
        out.update(epochs=m.epochs, batch_size=m.batch_size, learning_rate=m.learning_rate)
    return out


def training_set(model_dir: Path) -> pd.DataFrame | None:
    """(image_id, label) pairs a version trained on, or None for a version that did not record them."""
    path = Path(model_dir) / TRAINING_SET_FILE
    return pd.read_parquet(path) if path.exists() else None


def new_label_count(ws: Workspace, train_rows: pd.DataFrame) -> int | None:
    """How many (photo, label) pairs of `train_rows` the deployed model did not train on."""
    current = registry.current_version(ws)
    if current is None:
        return len(train_rows)
    seen = training_set(registry.model_dir(ws, current))
    if seen is None:
        return None
    known = set(zip(seen["image_id"].astype(str), seen["label"].astype(str), strict=True))
    pairs = zip(train_rows["image_id"].astype(str), train_rows["label"].astype(str), strict=True)
    return sum(pair not in known for pair in pairs)


def _unchanged(ws: Workspace, fingerprint: str, this_recipe: dict) -> str | None:
    """The newest version if it was trained on exactly these labels with this recipe, else None."""
    versions = registry.list_versions(ws)
    if not versions:
        return None
    spec = read_spec(registry.model_dir(ws, versions[-1]))
    if spec.get("labels_fingerprint") == fingerprint and spec.get("recipe") == this_recipe:
        return versions[-1]
    return None


def train(
    ws: Workspace, *, mode: str | None = None, pretrained: bool = True, force: bool = False,
    on_progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train a candidate model from the manifest and write it as a new registry version.

    Args:
        mode: "head" or "finetune" (default: `model.train_mode` in the settings).
        pretrained: False trains on a random-initialised body: the control showing the weights matter.
        force: train even when labels and settings are those of the newest version.
    Returns:
        TrainResult with the new version (a candidate; `loop.learning.deployment.deploy` decides whether it ships), or
        `unchanged=True` naming the newest version when there was nothing new to learn from.
    Raises:
        ModelError: no labeled images, fewer than 2 classes in the train split, missing backbone weights.
    Example:
        >>> result = train(open_workspace("data"))            # doctest: +SKIP
        >>> print(result.summary())
    """
    with one_training(ws):  # a hand-run train racing serve's retrain would make two identical versions
        return _train(ws, mode=mode, pretrained=pretrained, force=force, on_progress=on_progress)


@contextmanager
def one_training(ws: Workspace) -> Iterator[None]:
    """Hold the workspace's training lock; a second training waits for the first (then finds nothing new to
    learn from, unless labels arrived meanwhile, and says so instead of writing a twin version)."""
    from filelock import FileLock, Timeout

    ws.models_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(ws.models_dir / "training.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning("another training is running in %s; waiting for it to finish", ws.root)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _train(ws: Workspace, *, mode: str | None, pretrained: bool, force: bool,
           on_progress: ProgressCallback | None) -> TrainResult:
    """`train` once the training lock is held."""
    settings = ws.settings.model
    on_progress = on_progress or no_progress
    mode = mode or settings.train_mode
    if mode not in MODES:
        raise ModelError(f"unknown training mode {mode!r}; valid: {', '.join(MODES)}")
    started = time.monotonic()
    clock = PhaseClock()

    # 1. The data: labeled rows and their stable, item-grouped split (assigned at ingest). "valid" is the
    #    small gate set no model trains on; every other label trains.
    df = manifest.load(ws)
    rows = labeled_rows(ws, none_of_these=True, df=df)
    fingerprint = labels_fingerprint(rows)  # "none of these" labels included: they change the model too
    negatives = rows[rows["label"] == OTHER_LABEL].reset_index(drop=True)  # out-of-scope evidence, never a class
    rows = rows[rows["label"] != OTHER_LABEL].reset_index(drop=True)
    if rows.empty:
        raise ModelError("no labeled images with a split in the manifest; run `sortloop ingest FOLDER --labeled`")
    this_recipe = recipe(ws, mode, settings.backbone, pretrained)
    same = None if force else _unchanged(ws, fingerprint, this_recipe)
    if same is not None:
        n_train = int((rows["split"] == "train").sum())
        result = TrainResult(same, mode, read_spec(registry.model_dir(ws, same)).get("metrics", {}),
                             registry.model_dir(ws, same), n_trained=n_train, unchanged=True)
        logger.info("%s", result.summary())
        return result
    size = settings.image_size

    # 2. The resized cache: decode each photo once (draft JPEG, EXIF upright) into a lossless PNG at the
    #    model's size; every feature pass and gate re-evaluation reads these instead of originals.
    clock.lap("data")
    skipped = ensure_resized(ws, rows["image_id"].tolist(), rows["path"].tolist(), size, on_progress=on_progress)
    if skipped:
        rows = rows[has_resized(ws, rows["image_id"], size)].reset_index(drop=True)
    if len(negatives) and settings.unfamiliar:
        ensure_resized(ws, negatives["image_id"].tolist(), negatives["path"].tolist(), size)
        negatives = negatives[has_resized(ws, negatives["image_id"], size)]
    unlabeled = None  # the shop's sorted, unreviewed photos: they self-train the head (loop.model.self_training)
    if mode == "head" and settings.self_training:
        unlabeled = sorted_unlabeled_rows(df, seed=settings.seed)
        # optional evidence: a source folder deleted after sorting is no warning per photo, each night
        readable = has_resized(ws, unlabeled["image_id"], size) | unlabeled["path"].map(os.path.exists).to_numpy(bool)
        unlabeled = unlabeled[readable]
        ensure_resized(ws, unlabeled["image_id"].tolist(), unlabeled["path"].tolist(), size)
        unlabeled = unlabeled[has_resized(ws, unlabeled["image_id"], size)]
    clock.lap("resize")
    train_rows = rows[rows["split"] == "train"].reset_index(drop=True)
    valid_rows = rows[rows["split"] == "valid"].reset_index(drop=True)
    classes = sorted(train_rows["label"].astype(str).unique())  # fastai's order; stored, never re-derived
    for i, name in enumerate(classes):  # a manifest written before names were checked where they enter
        problem = class_name_problem(name) or twin_problem(name, classes[:i])
        if problem is not None:
            raise ModelError(f"label {name!r} cannot be a class ({problem}); relabel those photos "
                             "(e.g. in Label Studio) before training")
    if len(classes) < 2:
        raise ModelError(f"the train split has {len(classes)} class(es) ({', '.join(classes) or 'none'}); "
                         "label photos of at least 2 categories")
    unlearnable = sorted(set(valid_rows["label"].astype(str)) - set(classes))
    if unlearnable:
        logger.warning("labels only in the gate set (cannot be learned yet): %s", ", ".join(unlearnable))
    n_new = new_label_count(ws, train_rows)
    backbone_cv: dict[str, float] = {}
    name = settings.backbone
    if pretrained and len(settings.backbone_candidates) > 1:  # let the data choose, by item-grouped CV
        backbone_cv = {c: backbone_cv_accuracy(ws, c, train_rows, classes, on_progress=on_progress)
                       for c in settings.backbone_candidates}
        name = max(backbone_cv, key=lambda c: (backbone_cv[c], c == settings.backbone))
        logger.info("backbone by item-grouped CV: %s -> %s", backbone_cv, name)
    backbone = get_backbone(name, settings.backbone_weights_file)
    logger.info("training %s on %d labels (%s new, %d classes), gate set %d", mode, len(train_rows), n_new,
                len(classes), len(valid_rows))

    # 3. The network: timm architecture with the offline ImageNet body and a fresh classifier.
    net = create_network(ws, backbone.name, len(classes), pretrained=pretrained, seed=settings.seed)
    clock.lap("network")

    # 4. Fit. Both paths leave `net` a complete classifier and return gate-set probabilities computed the
    #    way the mode's own tooling computes them (in-memory torch head / fastai get_preds). Head mode also
    #    returns out-of-fold predictions of every training photo, and folds its calibration into `net`.
    oof = None
    if mode == "head":
        details, valid_probs, oof = fit_head(ws, net, backbone, train_rows, valid_rows, classes,
                                             pretrained=pretrained, on_progress=on_progress, clock=clock,
                                             unlabeled_rows=unlabeled)
    else:
        from loop.model.finetune import fit_finetune  # fastai is imported only on this path

        details, valid_probs = fit_finetune(ws, net, backbone, train_rows, valid_rows, classes,
                                            pretrained=pretrained, on_progress=on_progress)
        clock.lap("finetune")

    # 5. Evaluate: the gate set (user and web separately), the out-of-fold predictions (the estimate that
    #    uses every training label), calibration before/after, and the flag curves.
    metrics = metrics_by_source(valid_rows, valid_probs, classes)
    temperature = float(details.get("temperature", 1.0))
    extras = learning_estimates(train_rows, valid_rows, valid_probs, oof, classes, temperature)
    metrics.update(extras.pop("metrics"))
    clock.lap("estimates")

    # 6. Write the candidate: extras first, `model.json` last (a folder without it is not a version).
    version, out = registry.new_version_dir(ws)
    try:
        # The unfamiliar-photo score: reference set + threshold calibrated out of fold (`loop.scoring.unfamiliar`).
        oof_logits = None if oof is None else oof.logits / temperature  # as the shipped head computes them
        unfamiliar, oof_sent = (familiarity_section(ws, net, backbone, train_rows, negatives, out, oof_logits,
                                                    mode=mode, pretrained=pretrained)
                                if settings.unfamiliar else (None, None))
        if oof is not None and oof_sent is not None and oof_sent.any():
            # Flags are sized on the photos that reach a category folder: the unfamiliar ones are flagged anyway
            extras["flagging"] = kept_flagging(train_rows, oof, temperature, ~oof_sent)
        for name, m in metrics.items():
            if m["n"]:
                confusion_png(m, out / f"confusion_{name}.png", title=f"{version} {name}")
        predictions_frame(valid_rows, valid_probs, classes).to_parquet(out / "valid_predictions.parquet")
        train_rows[["image_id", "label", "item_id"]].astype(str).to_parquet(out / TRAINING_SET_FILE)
        if oof is not None:
            oof_frame(train_rows, oof, classes, temperature).to_parquet(out / "oof_predictions.parquet")
        spec = {
            "version": version,
            "architecture": backbone.name,
            "classes": classes,
            "image_size": size,
            "mean": list(backbone.mean),
            "std": list(backbone.std),
            "drop_rate": backbone.drop_rate,
            "metrics": metrics,
            "train_mode": mode,
            "training": {**details, **({"backbone_cv_accuracy": backbone_cv} if backbone_cv else {})},
            "temperature": temperature,
            **extras,
            "pretrained": pretrained,
            "body_weights": weights_tag(ws, backbone.name, pretrained=pretrained, seed=settings.seed),
            "labels_fingerprint": fingerprint,
            "recipe": this_recipe,
            "n_train": len(train_rows),
            "n_new": n_new,
            "n_valid": len(valid_rows),
            **({"unfamiliar": unfamiliar} if unfamiliar else {}),
        }
        save_artifact(net, spec, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    clock.lap("export")

    # 7. A faster INT8 copy for sorting: calibrated on training photos, used only if it is not significantly
    #    worse than the float model on the labeled validation photos (its verdict lands in model.json).
    if settings.int8:
        write_int8(ws, out, train_rows, valid_rows)
        clock.lap("int8")
    check_artifact(out)  # read back whole: a candidate that cannot sort never reaches the gate
    notes = [describe_learning(spec, ws)]
    result = TrainResult(version, mode, metrics, out, time.monotonic() - started, skipped, len(train_rows), n_new,
                         notes=notes, phases=clock.seconds)
    logger.info("%s", result.summary())
    logger.info("train phases: %s", clock.summary())
    return result


def familiarity_section(ws: Workspace, net, backbone, train_rows: pd.DataFrame, negatives: pd.DataFrame,
                        out: Path, oof_logits: np.ndarray | None, *, mode: str, pretrained: bool
                        ) -> tuple[dict | None, np.ndarray | None]:
    """Fit the unfamiliar score on the shipped network's body features (and, in head mode, the calibrated
    out-of-fold logits of the same photos), write its reference file into `out`, and return the
    `model.json["unfamiliar"]` section and which training photos it sends to `_other` out of fold
    ((None, None) with fewer than 2 items)."""
    items = train_rows["item_id"].fillna(train_rows["image_id"]).astype(str).to_numpy()
    if len(np.unique(items)) < 2:
        logger.info("no unfamiliar-photo threshold: the training labels show fewer than 2 items")
        return None, None
    feats = shipped_body_features(ws, net, backbone, train_rows["image_id"].tolist(), mode=mode, pretrained=pretrained)
    neg = (shipped_body_features(ws, net, backbone, negatives["image_id"].tolist(), mode=mode, pretrained=pretrained)
           if len(negatives) else None)
    settings = ws.settings.model
    shop = labeled_after_sorting(train_rows)
    familiarity, summary, oof = fit_familiarity(feats, train_rows["label"].astype(str).to_numpy(), items,
                                                negatives=neg, focus=shop,
                                                max_share=settings.unfamiliar_max_share, oof_logits=oof_logits,
                                                seed=settings.seed)
    section = save_familiarity(familiarity, summary, out)
    logger.info("unfamiliar threshold %.4f (sends %.1f%% of %d labeled photos out of fold%s), %d reference rows",
                section["threshold"], 100 * section["oof_in_scope_sent"], section["calibration_photos"],
                "" if section["threshold_shop_photos"] is None else
                f"; bounded on your {section['shop_photos']} labeled photos as well", section["reference_rows"])
    return section, np.isfinite(oof) & (oof >= familiarity.threshold)


def kept_flagging(train_rows: pd.DataFrame, oof, temperature: float, kept: np.ndarray) -> dict:
    """The flag curves (`loop.scoring.flagging.estimate`) on the out-of-fold photos the unfamiliar score keeps:
    the flags are there to catch the mistakes among photos that go to a category folder."""
    from loop.data.items import item_keys
    from loop.model.calibration import calibrated
    from loop.scoring.flagging import estimate

    rows = train_rows[kept].reset_index(drop=True)
    shop = labeled_after_sorting(rows)  # as `loop.model.estimates` does for every photo
    flagging = estimate(calibrated(oof.logits[kept], temperature), oof.labels[kept], item_keys(rows), focus=shop)
    on = f"out-of-fold ({oof.folds} item-grouped folds), photos not sent to the unfamiliar folder"
    if "focus" in flagging:
        on += f"; capped by your {flagging['focus']['n']} photos labeled after sorting"
    return {**flagging, "estimated_on": on}


def shipped_body_features(ws: Workspace, net, backbone, ids: list[str], *, mode: str, pretrained: bool
                          ) -> np.ndarray:
    """(N, F) pooled body features of `ids` through the network that ships: the cached frozen-body features
    in head mode (the body is not trained); recomputed through the trained body in finetune mode."""
    from loop.model.features import body_features

    if mode == "head":
        from loop.model.head import head_features

        return head_features(ws, net, backbone, ids, pretrained=pretrained)
    size = ws.settings.model.image_size
    batch = ws.settings.model.batch_size
    parts = [body_features(net, np.stack([load_resized(ws, i, size) for i in ids[s:s + batch]]), backbone.mean,
                           backbone.std) for s in range(0, len(ids), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def write_int8(ws: Workspace, model_dir: Path, train_rows: pd.DataFrame, valid_rows: pd.DataFrame) -> None:
    """`loop.model.quantize.quantize_artifact` on resized photos; a failure keeps the float model and is recorded.

    INT8 is judged on the labeled validation photos (a uniform sample of JUDGE_MAX_PHOTOS beyond that); without
    any (no gate set), on training photos outside the calibration sample: the float model knows them, but what
    is measured is what quantisation changes.
    """
    from loop.model.quantize import (
        CALIBRATION_PHOTOS,
        JUDGE_MAX_PHOTOS,
        JUDGE_PHOTOS,
        quantize_artifact,
        record_failure,
    )

    size = ws.settings.model.image_size
    calibration_ids = train_rows["image_id"].sample(frac=1.0, random_state=ws.settings.model.seed)
    calibration_ids = calibration_ids.head(CALIBRATION_PHOTOS)
    judged = valid_rows if len(valid_rows) else \
        train_rows[~train_rows["image_id"].isin(set(calibration_ids))].head(JUDGE_PHOTOS)
    if len(judged) > JUDGE_MAX_PHOTOS:
        judged = judged.sample(n=JUDGE_MAX_PHOTOS, random_state=ws.settings.model.seed)

    def load(ids: pd.Series) -> np.ndarray:
        return np.stack([load_resized(ws, i, size) for i in ids] or [np.zeros((size, size, 3), np.uint8)])[:len(ids)]

    try:
        labels = class_indices(judged["label"], read_spec(model_dir)["classes"])
        quantize_artifact(model_dir, load(calibration_ids), load(judged["image_id"]), labels,
                          alpha=ws.settings.gate.alpha)
    except Exception as exc:  # onnxruntime's quantiser raises assorted types; float sorting is unaffected
        logger.warning("INT8 export failed, sorting stays in float: %s", exc)
        record_failure(model_dir, f"INT8 export failed ({type(exc).__name__}: {str(exc)[:200]})")


def predictions_frame(rows: pd.DataFrame, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Validation predictions kept with the version (for audits and the portable-load check)."""
    best = probs.argmax(axis=1) if len(probs) else np.zeros(0, int)
    return pd.DataFrame({
        "image_id": rows["image_id"].astype(str).to_numpy(),
        "source": rows["source"].astype(str).to_numpy(),
        "label": rows["label"].astype(str).to_numpy(),
        "pred_label": [classes[i] for i in best],
        "pred_conf": probs.max(axis=1) if len(probs) else np.zeros(0),
        "probs": list(probs.astype(np.float32)),
    })

"""Mode "finetune": a fastai Learner over the same timm network the artifact stores.

Recipe (measured on ~400 real photos, see shared/reference/ml-stack.md): start the classifier from the
head mode's linear probe, then fastai `fine_tune` (one-cycle, one frozen epoch, default augmentations)
with every BatchNorm kept in eval mode and `train_bn=False`: letting the pretrained BatchNorm statistics
move cost ~0.15 accuracy on unseen items.
Caveat: importing fastai costs ~8 s, so only this module imports it, and only inside `fit_finetune`;
sorting and status never import this module.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from loop.data.resized import resized_path
from loop.errors import ModelError
from loop.model.backbones import Backbone
from loop.model.head import linear_probe
from loop.progress import ProgressCallback, no_progress
from loop.workspace import Workspace

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def fit_finetune(
    ws: Workspace,
    net: torch.nn.Module,
    backbone: Backbone,
    train_rows: pd.DataFrame,
    valid_rows: pd.DataFrame,
    classes: list[str],
    *,
    pretrained: bool = True,
    on_progress: ProgressCallback = no_progress,
) -> tuple[dict, np.ndarray]:
    """fastai `fine_tune` of `net` in place (one-cycle, default augmentations, body BatchNorm frozen).

    The classifier starts from the head mode's linear probe ("LP-FT"): a randomly initialised linear
    layer on these unnormalised features starts with a loss of ~5 and learned far too slowly
    (0.33 accuracy after 5 of 9 epochs on ikea), and a random head is known to distort pretrained
    features while it catches up.

    Returns:
        (details for model.json, validation probs (N, K) from fastai's `get_preds`).
    """
    from fastai.vision.all import (
        Callback,
        CategoryBlock,
        ColReader,
        ColSplitter,
        CrossEntropyLossFlat,
        DataBlock,
        ImageBlock,
        Learner,
        Normalize,
        TrainEvalCallback,
        accuracy,
        aug_transforms,
        set_seed,
    )
    from fastai.vision.all import (
        ProgressCallback as FastaiProgress,
    )
    from torch import nn

    settings = ws.settings.model
    size = settings.image_size
    set_seed(settings.seed, reproducible=True)
    probe, _ = linear_probe(ws, net, backbone, train_rows, classes, pretrained=pretrained,
                            on_progress=on_progress)

    # fastai sees the resized PNGs; validation rows with a learnable label give it a loss to report.
    known = valid_rows[valid_rows["label"].astype(str).isin(classes)]
    if known.empty:
        raise ModelError("finetune mode needs validation photos of the trained classes; ingest more labeled photos")
    frame = pd.concat([train_rows.assign(is_valid=False), known.assign(is_valid=True)], ignore_index=True)
    frame["file"] = [str(resized_path(ws, i, size)) for i in frame["image_id"]]
    frame["label"] = frame["label"].astype(str)
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=classes)),
        get_x=ColReader("file"), get_y=ColReader("label"), splitter=ColSplitter("is_valid"),
        batch_tfms=[*aug_transforms(), Normalize.from_stats(list(backbone.mean), list(backbone.std))],
    )
    dls = block.dataloaders(frame, bs=settings.batch_size, num_workers=0)
    if list(dls.vocab) != classes:
        raise ModelError(f"fastai's class order {list(dls.vocab)} differs from {classes}")

    head_params = {id(p) for p in net.get_classifier().parameters()}

    def body_and_head(model: nn.Module) -> list[list[nn.Parameter]]:
        params = list(model.parameters())
        return [[p for p in params if id(p) not in head_params], [p for p in params if id(p) in head_params]]

    class BodyBatchNormEval(Callback):
        """Keep every BatchNorm in eval mode: the pretrained running statistics must not move."""

        order = TrainEvalCallback.order + 1  # after fastai has put the model in train mode

        def before_train(self) -> None:
            for module in self.learn.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    class ReportProgress(Callback):
        order = 60  # after the Recorder, so the epoch's log is complete

        def before_fit(self) -> None:
            self.done, self.total = 0, self.n_epoch * len(self.dls.train)

        def after_batch(self) -> None:
            if self.training:
                self.done += 1
                on_progress(self.done, self.total)

        def after_epoch(self) -> None:
            logger.info("epoch %d: %s", self.epoch, self.recorder.log)

    report = ReportProgress()
    learn = Learner(dls, net, loss_func=CrossEntropyLossFlat(), metrics=accuracy, splitter=body_and_head,
                    train_bn=False, cbs=[BodyBatchNormEval(), report])
    learn.remove_cb(FastaiProgress)
    with learn.no_logging():
        learn.fine_tune(settings.epochs, base_lr=settings.learning_rate, freeze_epochs=1)
    learn.remove_cb(report)

    # Validation probabilities the fastai way, on every validation row (test_dl: no labels needed).
    net.eval()
    probs = np.zeros((0, len(classes)), np.float32)
    if len(valid_rows):
        files = pd.DataFrame({"file": [str(resized_path(ws, i, size)) for i in valid_rows["image_id"]]})
        test_dl = dls.test_dl(files, num_workers=0)
        with learn.no_logging():
            preds, _ = learn.get_preds(dl=test_dl)
        probs = preds.float().numpy()
    details = {"fastai": "fine_tune", "init": probe, "epochs": settings.epochs, "freeze_epochs": 1,
               "base_lr": settings.learning_rate, "batch_size": settings.batch_size,
               "augmentations": "aug_transforms()", "train_bn": False, "body_batchnorm": "eval"}
    return details, probs

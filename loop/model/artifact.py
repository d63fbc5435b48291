"""The portable model artifact: `model.safetensors` + `model.json` + `model.onnx`, and the Predictor.

Why not a fastai export: `learn.export()` pickles `PosixPath`, timm classes and label functions, so it
fails to load on Windows and needs fastai everywhere. Here the weights are a plain safetensors file, the
network is rebuilt from `model.json` with timm and loaded *strictly*, and the whole network is also
exported to ONNX, which sorts ~2x faster on CPU. Nothing is unpickled and fastai is never imported on the
loading path; the ONNX runtime does not even import torch.

The artifact is checked whole where it is used (train, deploy, sort, bundle: `check_files` and the
Predictor): each file's sha256 is in `model.json["checksums"]`, and the network's output size must equal
the class count, so a truncated file or a hand-edited class list is refused there with one line, never an
IndexError in the middle of a sort.
Caveat: the class order in `model.json` is the truth (fastai sorts label strings case-sensitively);
never re-derive it from folder names.

Example:
    >>> predictor = load_predictor(current_model_dir(ws))           # doctest: +SKIP
    >>> probs = predictor.predict(np.stack([load_model_input(p, predictor.image_size) for p in paths]))
    >>> labels = [predictor.classes[i] for i in probs.argmax(1)]
"""

from __future__ import annotations

import json
import logging
import os
import platform
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loop.atomic import write_json_atomic
from loop.data.images import file_sha256, normalise
from loop.errors import ModelError
from loop.scoring.unfamiliar import Familiarity, load_familiarity

if TYPE_CHECKING:  # torch is imported lazily: the ONNX path does not need it
    import torch

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # written by loop.model.quantize; used only when model.json["int8"]["passed"]
# INT8 weights use 7 of their 8 bits (loop.model.quantize): CPUs with and without VNNI then compute the same
# integer sums, so the gate's verdict, measured where the model trained, holds on the PC that sorts. An INT8 file
# without this mark in its verdict ("weight_bits") is not used by precision "auto".
INT8_WEIGHT_BITS = 7
ONNX_OPSET = 17
FEATURES_OUTPUT = "features"  # the ONNX graph's second output (models exported before it have only logits)
RUNTIMES = ("onnx", "torch")
PRECISIONS = ("auto", "float", "int8")  # auto: INT8 ONNX when model.json["int8"]["passed"]; int8: even if not
REQUIRED_SPEC_KEYS = ("architecture", "classes", "image_size", "mean", "std")


def build_network(spec: dict) -> torch.nn.Module:
    """A plain timm network (random weights) of the shape `spec` describes, in eval mode.

    Args:
        spec: at least `architecture` (a timm name) and `classes`; optional `drop_rate`.
    """
    import timm

    _check_spec(spec)
    try:
        net = timm.create_model(
            spec["architecture"], pretrained=False, num_classes=len(spec["classes"]),
            drop_rate=float(spec.get("drop_rate", 0.0)),
        )
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ModelError(f"cannot build architecture {spec['architecture']!r}: {exc}") from None
    return net.eval()


def save_artifact(model: torch.nn.Module, spec: dict, out_dir: Path | str) -> Path:
    """Write `model.safetensors`, `model.onnx` and, last, `model.json` into `out_dir`; returns `out_dir`.

    `model.json` is written last and atomically, so a folder without it is an incomplete version that the
    registry ignores. `created_at` and `versions` are filled in if `spec` lacks them.

    Args:
        model: a network `build_network(spec)` can rebuild (checked: it is reloaded strictly).
        spec: JSON-able dict with at least architecture, classes (ordered), image_size, mean, std.
        out_dir: the version folder (created if missing).
    Raises:
        ModelError: if the spec is incomplete or does not describe `model`.
    """
    from safetensors.torch import save_file

    _check_spec(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}

    # 1. the rebuilt network must accept these weights strictly, or the artifact would not load later
    probe = build_network(spec)
    try:
        probe.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"spec does not describe the model ({spec['architecture']}, "
                         f"{len(spec['classes'])} classes): {str(exc)[:300]}") from None
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"architecture": str(spec["architecture"])})
    os.chmod(out_dir / WEIGHTS_FILE, 0o644)

    # 2. ONNX of the whole network (logits and features out)
    export_onnx(probe, int(spec["image_size"]), out_dir / ONNX_FILE)

    # 3. the self-describing spec, last
    full = dict(spec)
    full.setdefault("created_at", datetime.now(UTC).isoformat())
    full.setdefault("versions", runtime_versions())
    full["files"] = {"weights": WEIGHTS_FILE, "onnx": ONNX_FILE, "onnx_opset": ONNX_OPSET}
    full["checksums"] = {name: file_sha256(out_dir / name) for name in (WEIGHTS_FILE, ONNX_FILE)}
    write_json_atomic(out_dir / SPEC_FILE, full, indent=2, default=str)
    logger.info("saved model artifact to %s", out_dir)
    return out_dir


def export_onnx(net: torch.nn.Module, size: int, path: Path) -> None:
    """Write `net` as an ONNX graph with outputs `logits` and `features` for `size` px inputs (any batch).

    The legacy exporter: one file, ~5x faster than dynamo. TF-style "same" padding is fixed for the one
    input size, so the graph has no shape arithmetic (which also lets ONNX Runtime quantise it: see
    loop.model.quantize). Modifies `net`'s padding in place (`static_padding`): pass a copy to keep it.
    """
    import torch

    dummy = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            with_features(static_padding(net.eval(), size)), (dummy,), str(path), input_names=["input"],
            output_names=["logits", FEATURES_OUTPUT],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, FEATURES_OUTPUT: {0: "batch"}},
            opset_version=ONNX_OPSET, dynamo=False,
        )


def with_features(net: torch.nn.Module) -> torch.nn.Module:
    """`net` wrapped to return (logits, pooled body features), so the exported ONNX graph has both outputs
    (the features are what `loop.scoring.unfamiliar` scores; they cost nothing extra: the network computes them)."""
    import torch

    class WithFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return network_outputs(self.net, x)

    return WithFeatures()


def network_outputs(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pooled pre-classifier features) of a timm network: one pass, the same as `net(x)`."""
    features = net.forward_head(net.forward_features(x), pre_logits=True)
    return net.get_classifier()(features), features


def static_padding(net: torch.nn.Module, size: int) -> torch.nn.Module:
    """`net` with each dynamic TF-"same" conv (timm `Conv2dSame`) replaced by a fixed zero-pad + plain conv.

    timm pads such convs from the input's shape at run time, which ONNX records as ~300 shape-arithmetic
    nodes. For the one input size the artifact takes, the padding is a constant: same outputs, plain graph.
    Modifies `net` in place (weights shared) and returns it.
    """
    import torch
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    in_sizes: dict[str, tuple[int, int]] = {}
    hooks = [module.register_forward_pre_hook(
                 lambda _m, args, name=name: in_sizes.__setitem__(name, tuple(args[0].shape[-2:])))
             for name, module in net.named_modules() if isinstance(module, Conv2dSame)]
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    for name, same in [(n, m) for n, m in net.named_modules() if n in in_sizes]:
        conv = torch.nn.Conv2d(same.in_channels, same.out_channels, same.kernel_size, same.stride, 0,
                               same.dilation, same.groups, same.bias is not None)
        conv.weight, conv.bias = same.weight, same.bias
        pad = torch.nn.ZeroPad2d(pad_same_arg(list(in_sizes[name]), same.weight.shape[-2:], same.stride, same.dilation))
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attr, torch.nn.Sequential(pad, conv))
    return net


def read_spec(model_dir: Path | str) -> dict:
    """The parsed `model.json` of a version folder (ModelError if missing or unreadable)."""
    path = Path(model_dir) / SPEC_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} not found: {model_dir} is not a model artifact") from None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise ModelError(f"{path} is unreadable ({exc}); pick another version") from None
    _check_spec(spec)
    return spec


def spec_version(spec: dict, model_dir: Path | str) -> str:
    """The artifact's version name: model.json's, else its folder's name."""
    return str(spec.get("version", Path(model_dir).name))


def check_files(model_dir: Path | str, names: tuple[str, ...] | None = None) -> dict:
    """The spec, after checking the artifact's files against `model.json["checksums"]` (all listed files,
    or only `names`): each must exist and hash as recorded. An artifact older than checksums is only
    checked for presence.

    Raises:
        ModelError: a file is missing or damaged (one line naming it and the way out).
    """
    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    sums = spec.get("checksums") or {}
    if not isinstance(sums, dict):
        raise ModelError(f"{model_dir / SPEC_FILE} has no valid checksums; {_WAY_OUT}")
    for name in names if names is not None else tuple(sums):
        path = model_dir / name
        if not path.is_file():
            raise ModelError(f"{path} is missing; the artifact is incomplete: {_WAY_OUT}")
        if name in sums:
            try:
                digest = file_sha256(path)
            except OSError as exc:
                raise ModelError(f"{path} is unreadable ({exc.strerror or exc}): {_WAY_OUT}") from None
            if digest != sums[name]:
                raise ModelError(f"{path} is damaged (its sha256 is not the one in {SPEC_FILE}): {_WAY_OUT}")
    return spec


def check_artifact(model_dir: Path | str) -> dict:
    """The spec of a whole, usable artifact: every checksummed file intact (`check_files`) and the ONNX
    model loading with one output per class. For train, deploy and bundle (sort checks what it loads).

    Raises:
        ModelError: what is wrong, in one line.
    """
    spec = check_files(model_dir)
    Predictor(model_dir, "onnx")
    return spec


_WAY_OUT = "deploy or roll back to another version (`sortloop rollback`), or train again"


def check_output_size(spec: dict, n_outputs: object, where: Path) -> None:
    """The network must have one output per class in `model.json` (a hand-edited class list would make the
    sort index past the end, or label photos with the wrong class)."""
    if n_outputs != len(spec["classes"]):
        raise ModelError(f"{where} has {n_outputs} outputs but {SPEC_FILE} lists {len(spec['classes'])} classes; "
                         f"the artifact does not fit together: {_WAY_OUT}")


class Predictor:
    """Batched inference from an artifact folder, with no fastai and no unpickling.

    Attributes:
        version: the artifact's version name (e.g. "v0003").
        classes: class names, index i = column i of `predict`'s output.
        image_size: the square input size; feed `load_model_input(path, image_size)` arrays.
        mean, std: per-channel normalisation applied inside `predict`.
        spec: the whole `model.json`.
        runtime: "onnx" or "torch".
    """

    def __init__(self, model_dir: Path | str, runtime: str = "onnx", *, threads: int | None = None,
                 precision: str = "float"):
        if runtime not in RUNTIMES:
            raise ModelError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
        if precision not in PRECISIONS:
            raise ModelError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        self.model_dir = Path(model_dir)
        self.spec = read_spec(self.model_dir)
        self.version: str = spec_version(self.spec, self.model_dir)
        self.classes: list[str] = list(self.spec["classes"])
        self.image_size: int = int(self.spec["image_size"])
        self.mean: tuple[float, ...] = tuple(float(v) for v in self.spec["mean"])
        self.std: tuple[float, ...] = tuple(float(v) for v in self.spec["std"])
        self.runtime = runtime
        self._session: Any = None
        self._net: Any = None
        self.int8 = runtime == "onnx" and (precision == "int8" or (precision == "auto" and int8_passed(self.spec)))
        if precision == "int8" and (runtime != "onnx" or not (self.model_dir / INT8_FILE).exists()):
            raise ModelError(f"precision 'int8' needs runtime 'onnx' and {INT8_FILE} in {self.model_dir}; "
                             "retrain with model.int8 = true, or use precision 'auto'")
        model_file = (INT8_FILE if self.int8 else ONNX_FILE) if runtime == "onnx" else WEIGHTS_FILE
        check_files(self.model_dir, (model_file,))
        if runtime == "onnx":
            self._session = _onnx_session(self.model_dir / model_file, threads)
            check_output_size(self.spec, self._session.get_outputs()[0].shape[-1], self.model_dir / model_file)
        else:
            self._net = _torch_network(self.spec, self.model_dir / WEIGHTS_FILE, threads)
        # The unfamiliar-photo decision (None: a model trained before it existed, which sorts as before).
        self.familiarity: Familiarity | None = load_familiarity(self.model_dir, self.spec)
        if self.familiarity is not None and self._session is not None and FEATURES_OUTPUT not in {
                o.name for o in self._session.get_outputs()}:
            raise ModelError(f"{self.model_dir}: model.json has an unfamiliar threshold but the ONNX model has no "
                             f"'{FEATURES_OUTPUT}' output; the artifact is mixed up, retrain or pick another version")

    def __repr__(self) -> str:
        runtime = f"{self.runtime} int8" if self.int8 else self.runtime
        return f"Predictor({self.version}, {len(self.classes)} classes, {self.image_size}px, {runtime})"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a batch of images.

        Args:
            batch: uint8 (N, H, W, 3) with H = W = image_size, as `load_model_input` returns.
        Returns:
            float32 (N, K) probabilities, rows sum to 1, columns in `classes` order.
        """
        return softmax(self._forward(batch, features=False)[0])

    def predict_with_familiarity(self, batch: np.ndarray) -> Prediction:
        """Probabilities and, if the model has the score, each photo's unfamiliar score and decision.

        The one call every sorter makes (`loop.sortcore`, the frozen sorter, the Ray workers), so all of
        them send the same photos to `_other/`.
        """
        if self.familiarity is None:
            return Prediction(self.predict(batch), None, None)
        logits, features = self._forward(batch, features=True)
        scores, unfamiliar = self.familiarity.decide(features, logits)
        return Prediction(softmax(logits), scores, unfamiliar)

    def body_features(self, batch: np.ndarray) -> np.ndarray:
        """(N, F) pooled body features of a batch: what the unfamiliar score compares (float32)."""
        if self._session is not None and FEATURES_OUTPUT not in {o.name for o in self._session.get_outputs()}:
            raise ModelError(f"{self.model_dir}: this ONNX model has no '{FEATURES_OUTPUT}' output (exported "
                             "before the unfamiliar score); use runtime 'torch' or retrain")
        return self._forward(batch, features=True)[1]

    def _forward(self, batch: np.ndarray, *, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (N, K), pooled body features (N, F) if asked for)."""
        batch = np.asarray(batch)
        if batch.ndim == 3:
            raise ModelError(f"predict takes a batch (N, H, W, 3); got one image {batch.shape}: use batch[None]")
        expected = (self.image_size, self.image_size, 3)
        if batch.ndim != 4 or batch.shape[1:] != expected or batch.dtype != np.uint8:
            raise ModelError(f"predict takes uint8 (N, {self.image_size}, {self.image_size}, 3); "
                             f"got {batch.dtype} {batch.shape}")
        if len(batch) == 0:
            width = len(self.familiarity.reference[0]) if self.familiarity is not None else 0
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, width), np.float32)
        x = normalise(batch, self.mean, self.std)
        feats = None
        if self._session is not None:
            outputs = self._session.run(["logits", FEATURES_OUTPUT] if features else ["logits"], {"input": x})
            logits, feats = outputs[0], (outputs[1] if features else None)
        else:
            import torch

            with torch.inference_mode():
                tensor = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
                out, body = network_outputs(self._net, tensor)
                logits, feats = out.float().numpy(), (body.float().numpy() if features else None)
        return np.asarray(logits, np.float32), feats


@dataclass
class Prediction:
    """One batch's output: probabilities, and the unfamiliar scores and decisions (None: no score in the model)."""

    probs: np.ndarray
    unfamiliar_scores: np.ndarray | None
    unfamiliar: np.ndarray | None

    def subset(self, rows: list[int]) -> Prediction:
        """The same for `rows` only."""
        scores, unfamiliar = self.unfamiliar_scores, self.unfamiliar
        return Prediction(self.probs[rows], None if scores is None else scores[rows],
                          None if unfamiliar is None else unfamiliar[rows])

    @staticmethod
    def concat(parts: list[Prediction]) -> Prediction:
        """The predictions of consecutive sub-batches as one batch's."""
        def joined(arrays: list[np.ndarray | None]) -> np.ndarray | None:
            return None if any(a is None for a in arrays) else np.concatenate(arrays)  # type: ignore[arg-type]

        return Prediction(np.concatenate([p.probs for p in parts]), joined([p.unfamiliar_scores for p in parts]),
                          joined([p.unfamiliar for p in parts]))


def load_predictor(model_dir: Path | str, runtime: str = "onnx", *, threads: int | None = None,
                   precision: str = "float") -> Predictor:
    """Load an artifact folder for inference.

    Args:
        model_dir: a version folder, e.g. `registry.current_model_dir(ws)`.
        runtime: "onnx" (default, ~2x faster on CPU, no torch import) or "torch" (timm, strict load).
        threads: intra-op threads (None = the runtime's default, all cores).
        precision: "float" (default); "auto": the INT8 ONNX model when it passed its gate
            (`model.json["int8"]["passed"]`, see loop.model.quantize), else float; "int8": the INT8 model even
            if the gate refused it (the user's risk).
    Raises:
        ModelError: missing/damaged files or weights that do not fit the described network.
    """
    return Predictor(model_dir, runtime, threads=threads, precision=precision)


def int8_passed(spec: dict) -> bool:
    """Whether the version has an INT8 ONNX model that passed its gate and computes the same on every CPU.

    Why the second condition: an INT8 file quantised with 8-bit weights (before INT8_WEIGHT_BITS) gives other
    answers on CPUs without VNNI, whose int16 sums saturate, than on the machine whose gate passed it (measured
    on an AMD EPYC with AVX2 only: the bench model agreed with float on 50 of 64 photos there, 62 of 64 on the
    machine it passed on). Such a version sorts in float until it is trained again."""
    verdict = spec.get("int8") or {}
    return bool(verdict.get("passed")) and verdict.get("weight_bits") == INT8_WEIGHT_BITS


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed in float64 for stability; float32 (N, K) out."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def runtime_versions() -> dict[str, str]:
    """Library versions worth recording next to a model (for provenance, not for loading)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("sortloop", "torch", "timm", "fastai", "onnx", "onnxruntime", "safetensors", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _check_spec(spec: dict) -> None:
    missing = [k for k in REQUIRED_SPEC_KEYS if k not in spec]
    if missing:
        raise ModelError(f"model spec lacks {', '.join(missing)}; it needs {', '.join(REQUIRED_SPEC_KEYS)}")
    if not isinstance(spec["classes"], list) or len(spec["classes"]) < 2:
        raise ModelError(f"model spec needs at least 2 classes in order; got {spec['classes']!r}")


def _onnx_session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    if not path.exists():
        raise ModelError(f"{path} not found; the artifact is incomplete (try runtime='torch' or another version)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise ModelError(f"{path} does not load in ONNX Runtime ({str(exc)[:200]})") from None


def _torch_network(spec: dict, weights: Path, threads: int | None) -> Any:
    try:
        import timm  # noqa: F401  (build_network needs it)
        import torch
    except ImportError:
        raise ModelError("runtime 'torch' needs torch and timm: `pip install 'sortloop[train]'`, "
                         "or sort with the default runtime 'onnx' (sort.runtime)") from None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not weights.exists():
        raise ModelError(f"{weights} not found; the artifact is incomplete")
    if threads:
        torch.set_num_threads(threads)
    net = build_network(spec)
    try:
        net.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, SafetensorError) as exc:
        raise ModelError(f"{weights} does not fit {spec['architecture']} with {len(spec['classes'])} classes "
                         f"({str(exc)[:200]})") from None
    return net.eval().to(memory_format=torch.channels_last)



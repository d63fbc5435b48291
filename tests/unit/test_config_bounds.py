"""Every number in the config has a sane range: a bad value is one line naming the key, from the TOML file
or from a SORTLOOP_* variable, and the command stops before doing anything."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from loop.config import load_settings
from loop.errors import ConfigError
from sortloop.cli import app

# (section, key, a hostile value): each must be refused
HOSTILE = [
    ("schedule", "pull_minutes", 0.0001),  # the red team's: 39 jobs in 20 s
    ("schedule", "push_minutes", 0),
    ("schedule", "scan_minutes", -5),
    ("schedule", "watch_minutes", 0.5),
    ("schedule", "pull_minutes", 1e9),
    ("schedule", "misfire_grace_s", 0),
    ("gate", "alpha", 0),  # would turn the gate off
    ("gate", "alpha", 1.5),
    ("split", "user_valid_fraction", 1),
    ("sort", "batch_size", 0),
    ("sort", "workers", -1),
    ("sort", "flag_threshold", 1.5),
    ("model", "epochs", 0),
    ("model", "learning_rate", 0),
    ("labelstudio", "port", 70000),
    ("labelstudio", "start_timeout_s", 0),
    ("labelstudio", "push_batch_size", 0),
    ("items", "near_duplicate_distance", 65),
]
# values at the edges of the ranges stay accepted
ACCEPTED = [("schedule", "pull_minutes", 1), ("gate", "alpha", 0.01), ("gate", "alpha", 0.2),
            ("split", "web_valid_fraction", 0), ("sort", "workers", 0),
            ("split", "user_valid_fraction", 0)]  # 0: no gate set; the gate compares on new labels


@pytest.mark.parametrize(("section", "key", "value"), HOSTILE)
def test_a_hostile_value_is_one_line_naming_the_key(tmp_path, monkeypatch, section, key, value) -> None:
    config = tmp_path / "sortloop.toml"
    config.write_text(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}: ") as err:
        load_settings(config)
    assert "\n" not in str(err.value)
    monkeypatch.setenv(f"SORTLOOP_{section.upper()}__{key.upper()}", str(value))
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}: "):
        load_settings(None)


@pytest.mark.parametrize(("section", "key", "value"), ACCEPTED)
def test_values_at_the_edges_are_accepted(tmp_path, section, key, value) -> None:
    config = tmp_path / "sortloop.toml"
    config.write_text(f"[{section}]\n{key} = {value}\n")
    assert getattr(getattr(load_settings(config), section), key) == value


def test_the_cli_stops_with_the_key_named(ws) -> None:
    ws.config_file.write_text("[schedule]\npull_minutes = 0.0001\n")
    result = CliRunner().invoke(app, ["status", "-w", str(ws.root)])
    assert result.exit_code == 1
    assert result.output.startswith("error: schedule.pull_minutes: ") and "Traceback" not in result.output


def test_the_retired_gate_rules_of_an_older_workspace_are_ignored_with_a_warning(tmp_path, caplog) -> None:
    """A sortloop.toml written before the gate refused only significant losses still loads."""
    config = tmp_path / "sortloop.toml"
    config.write_text("[gate]\nmin_accuracy_gain = -0.10\nmin_accuracy_support = 50\nalpha = 0.05\n"
                      "max_recall_drop = 0.10\nmin_class_support = 10\n")
    with caplog.at_level("WARNING"):
        settings = load_settings(config)
    assert settings.gate.alpha == 0.05 and not hasattr(settings.gate, "min_accuracy_gain")
    assert "gate.min_accuracy_gain is no longer used" in caplog.text
    config.write_text("[gate]\nalpah = 0.05\n")  # a typo is an error naming the valid keys
    with pytest.raises(ConfigError, match=r"^gate\.alpah: unknown key; valid keys: alpha "):
        load_settings(config)
    config.write_text("[sort]\nflag_treshold = 0.5\n")
    with pytest.raises(ConfigError, match=r"^sort\.flag_treshold: unknown key; valid keys: .*flag_threshold"):
        load_settings(config)

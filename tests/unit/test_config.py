"""Configuration: defaults, the documented example file, environment overrides, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pe_triage_node.cli import main
from pe_triage_node.config import NodeConfig, load_config
from pe_triage_node.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_example_file_documents_exactly_the_defaults() -> None:
    assert load_config(ROOT / "config" / "node.toml").masked() == NodeConfig().masked()


def test_defaults_keep_state_under_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None)
    assert cfg.receiver.ae_title == "PETRIAGE" and cfg.receiver.port == 11112
    assert cfg.spool_dir == tmp_path / "var" / "spool"
    assert cfg.database_url == f"sqlite:///{tmp_path}/var/node.db"


def test_paths_are_absolute_once_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths are taken against the directory the node started in, never later."""
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "node.toml"
    f.write_text(
        '[node]\nvar_dir = "state"\n[spool]\npath = "in"\n[database]\nurl = "sqlite:///db/n.db"\n'
        '[inference]\nweights_manifest = "w/manifest.json"\n'
    )
    cfg = load_config(f)
    monkeypatch.chdir("/")
    assert cfg.node.var_dir == tmp_path / "state"
    assert cfg.spool_dir == tmp_path / "state" / "in"
    assert cfg.resolve(Path("outputs")) == tmp_path / "state" / "outputs"
    assert cfg.export.outputs_dir == tmp_path / "state" / "outputs"
    assert cfg.inference.weights_manifest == tmp_path / "w" / "manifest.json"
    assert cfg.database_url == f"sqlite:///{tmp_path}/db/n.db"


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "node.toml"
    f.write_text('[receiver]\nport = 4000\nae_title = "FROMFILE"\n')
    monkeypatch.setenv("PETRIAGE_RECEIVER__PORT", "4001")
    cfg = load_config(f)
    assert cfg.receiver.port == 4001
    assert cfg.receiver.ae_title == "FROMFILE"


@pytest.mark.parametrize(
    ("toml", "key", "fragment"),
    [
        ("[receiver]\nport = 70000\n", "receiver.port", "70000"),
        ('[receiver]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', "receiver.ae_title", "WAY_TOO_LONG_AE_TITLE"),
        ('[selection]\nseries_description_exclude = "(unclosed"\n', "selection.series_description_exclude", "(unclosed"),
        ("[queue]\nlease_s = 10\nheartbeat_s = 20\n", "queue", "heartbeat_s"),
        ("[receiver]\nunknown_key = 1\n", "receiver.unknown_key", "1"),
        ("[receiver.tls]\nenabled = true\n", "receiver.tls", "certificate"),
    ],
)
def test_bad_value_names_key_value_and_reason(tmp_path: Path, toml: str, key: str, fragment: str) -> None:
    f = tmp_path / "node.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    message = str(err.value)
    assert key in message and fragment in message


def test_not_toml_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text("[receiver\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f)


def test_check_config_masks_database_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "node.toml"
    f.write_text('[database]\nurl = "postgresql+psycopg://triage:s3cret@db:5432/petriage"\n')
    assert main(["check-config", "--config", str(f)]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert json.loads(out)["database"]["url"] == "postgresql+psycopg://triage:****@db:5432/petriage"


def test_check_config_exits_2_with_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "node.toml"
    f.write_text("[receiver]\nport = -1\n")
    with pytest.raises(SystemExit) as stopped:
        main(["check-config", "--config", str(f)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "receiver.port" in err and "-1" in err

"""The daemon's TOML configuration: what a correct file gives, and the error each mistake produces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vduproxy.config import (
    DEFAULT_BUSY_POLL_US,
    DEFAULT_CONTROL,
    ConfigError,
    config_from_dict,
    load_config,
    parse_listen,
)

pytestmark = pytest.mark.unit

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"


def test_full_file(tmp_path: Path) -> None:
    path = tmp_path / "v.toml"
    path.write_text(
        """
[daemon]
control = "/tmp/x/control.sock"
metrics = "127.0.0.1:9100"

[pairs.web]
socket = "/tmp/x/web.sock"
device = "/dev/vhost-vdpa-0"
svq = "always"
mac = "52:54:00:12:34:56"
queues = 2
socket_mode = "0660"
socket_group = "kvm"

[pairs.db]
socket = "/tmp/x/db.sock"
client = true
"""
    )
    cfg = load_config(path)
    assert cfg.control == "/tmp/x/control.sock"
    assert cfg.metrics == ("127.0.0.1", 9100)
    web, db = cfg.pairs
    assert (web.name, web.device, web.svq, web.queues) == ("web", "/dev/vhost-vdpa-0", "always", 2)
    assert web.mac == bytes.fromhex("525400123456")
    assert (web.socket_mode, web.socket_group) == (0o660, "kvm")
    # defaults: the software device, SVQ only during migration, a private socket
    assert (db.device, db.svq, db.socket_mode, db.client, db.mac) == ("sim", "auto", 0o600, True, None)


def test_defaults_and_disabled_control() -> None:
    cfg = config_from_dict({"pairs": {"a": {"socket": "/tmp/a.sock"}}})
    assert cfg.control == DEFAULT_CONTROL and cfg.metrics is None
    cfg = config_from_dict({"daemon": {"control": ""}, "pairs": {"a": {"socket": "/tmp/a.sock"}}})
    assert cfg.control is None


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({}, "pairs", "at least one"),
    ({"pairs": {}}, "pairs", "at least one"),
    ({"pairs": {"a": {"socket": "/s"}}, "extra": 1}, "", "unknown key(s) extra"),
    ({"pairs": {"a": {}}}, "pairs.a", "'socket' is required"),
    ({"pairs": {"a": {"socket": "/s", "svq": "sometimes"}}}, "pairs.a.svq", "auto, always, never"),
    ({"pairs": {"a": {"socket": "/s", "mac": "52:54:00"}}}, "pairs.a.mac", "not a MAC"),
    ({"pairs": {"a": {"socket": "/s", "queues": 0}}}, "pairs.a.queues", "1..128"),
    ({"pairs": {"a": {"socket": "/s", "queues": True}}}, "pairs.a.queues", "1..128"),
    ({"pairs": {"a": {"socket": "/s", "socket_mode": 0o660}}}, "pairs.a.socket_mode", "must be a string"),
    ({"pairs": {"a": {"socket": "/s", "socket_mode": "999"}}}, "pairs.a.socket_mode", "octal"),
    ({"pairs": {"a": {"socket": "/s", "client": "yes"}}}, "pairs.a.client", "true or false"),
    ({"pairs": {"a": {"socket": "/s", "svq_busy_poll_us": 5000}}}, "pairs.a.svq_busy_poll_us", "0..1000"),
    ({"pairs": {"a": {"socket": "/s", "svq_busy_poll_us": "50"}}}, "pairs.a.svq_busy_poll_us", "0..1000"),
    ({"pairs": {"a": {"socket": "/s", "sockets": "/t"}}}, "pairs.a", "unknown key(s) sockets"),
    ({"pairs": {"a": {"socket": "x" * 200}}}, "pairs.a.socket", "1..107 bytes"),
    ({"pairs": {"bad name": {"socket": "/s"}}}, "pairs.bad name", "pair names"),
    ({"pairs": {"a": "oops"}}, "pairs.a", "must be a table"),
    (
        {"pairs": {"a": {"socket": "/s"}, "b": {"socket": "/s"}}},
        "pairs.b.socket",
        "already used by pairs.a",
    ),
    (
        {
            "pairs": {
                "a": {"socket": "/s", "device": "/dev/vhost-vdpa-0"},
                "b": {"socket": "/t", "device": "/dev/vhost-vdpa-0"},
            }
        },
        "pairs.b.device",
        "already used by pairs.a",
    ),
    ({"daemon": {"control": "/s"}, "pairs": {"a": {"socket": "/s"}}}, "daemon.control", "vhost-user socket"),
    ({"daemon": {"metrics": "9100"}, "pairs": {"a": {"socket": "/s"}}}, "daemon.metrics", "HOST:PORT"),
    ({"daemon": {"metrics": "h:70000"}, "pairs": {"a": {"socket": "/s"}}}, "daemon.metrics", "out of range"),
    ({"daemon": {"log": "x"}, "pairs": {"a": {"socket": "/s"}}}, "daemon", "unknown key(s) log"),
]


@pytest.mark.parametrize(("raw", "where", "text"), BAD, ids=[f"{w or 'top'}-{t[:18]}" for _, w, t in BAD])
def test_mistakes_name_their_place(raw: dict[str, Any], where: str, text: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert err.value.where == where
    assert text in str(err.value)


def test_sim_devices_may_repeat() -> None:
    # every sim spec opens its own software device, so two pairs may both say "sim"
    cfg = config_from_dict({"pairs": {"a": {"socket": "/a", "device": "sim"}, "b": {"socket": "/b", "device": "sim"}}})
    assert [p.device for p in cfg.pairs] == ["sim", "sim"]


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pairs.a\nsocket=1")
    with pytest.raises(ConfigError, match="not valid TOML") as err:
        load_config(bad)
    assert str(bad) in str(err.value)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[pairs.a]\nsocket = "/s"\nsvq = "x"\n')
    with pytest.raises(ConfigError) as err:
        load_config(wrong)
    assert str(wrong) in str(err.value) and "pairs.a.svq" in str(err.value)


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_listen("[::1]:9100") == ("::1", 9100)
    for bad in ("", ":9100", "host:", "host:port", "host:0"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_contrib_example_config_loads() -> None:
    cfg = load_config(CONTRIB / "vduproxy.toml")
    assert len(cfg.pairs) >= 2
    # what QEMU, running as another user, needs: a group-accessible socket
    assert all(p.socket_mode == 0o660 and p.socket_group for p in cfg.pairs)


def test_svq_busy_poll_is_per_pair() -> None:
    cfg = config_from_dict({"pairs": {"a": {"socket": "/a", "svq_busy_poll_us": 0}, "b": {"socket": "/b"}}})
    assert [p.svq_busy_poll_us for p in cfg.pairs] == [0, DEFAULT_BUSY_POLL_US]

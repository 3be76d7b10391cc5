# SPDX-License-Identifier: GPL-2.0-or-later
"""Configuration: the seed's file loads as written; every error names the key and the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlms2amqp.config import KEYS, load_config, strip_comments
from dlms2amqp.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

SEED = """{
  "HostName": "172.17.230.131",  // hostname of RabbitMQ server
  "Port": 5672, // port of RabbitMQ server
  "VirtualHost": "HEX", // virtual host on RabbitMQ server
  "UserName": "adm", // user name used to access of RabbitMQ server
  "Password": "test", // password used to access of RabbitMQ server
  "DebugFile": "log.txt",   // Debug file
  "InQueue": "INDLMS", // Queue on server which is monitored for incoming commands
  "OutQueue": "OUTDLMS" // Queue on server where data are put
}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "dlms2amqp.json"
    p.write_text(text)
    return p


def test_seed_file_loads_with_comments(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SEED))
    assert cfg.HostName == "172.17.230.131"
    assert cfg.VirtualHost == "HEX"
    assert cfg.InQueue == "INDLMS" and cfg.OutQueue == "OUTDLMS"
    assert cfg.password.reveal() == "test"
    assert "'test'" not in repr(cfg) and "Password" not in cfg.as_dict()
    assert cfg.debug_file == tmp_path / "log.txt"
    # added keys take their defaults
    assert cfg.Workers == (os.cpu_count() or 1)
    assert cfg.QueueType == "classic"
    assert cfg.prefetch == 2 * cfg.Workers * cfg.SessionsPerWorker
    assert cfg.dead_letter_queue == "INDLMS.dead"


def test_comment_markers_inside_strings_survive() -> None:
    text = '{"a": "amqps://h/x", // c\n "b": "x /* y */ z" /* block */}'
    assert strip_comments(text) == '{"a": "amqps://h/x", \n "b": "x /* y */ z" }'
    assert strip_comments('{"a": "q\\"//x"}') == '{"a": "q\\"//x"}'


@pytest.mark.parametrize(
    "body, words",
    [
        ('{"HostNam": "x"}', ["HostNam", "HostName"]),
        ('{"hostname": "x"}', ["hostname", "did you mean HostName"]),
        ('{"Port": "5672"}', ["Port", "whole number"]),
        ('{"Port": 70000}', ["Port", "between 1 and 65535"]),
        ('{"Workers": true}', ["Workers", "whole number"]),
        ('{"QueueType": "stream"}', ["QueueType", "classic, quorum"]),
        ('{"InQueue": ""}', ["InQueue", "empty"]),
        ('{"Password": 1234}', ["Password", "string"]),
        ('{"TlsCaFile": "nope.pem"}', ["TlsCaFile", "does not exist"]),
        ('{"PasswordFile": "nope"}', ["PasswordFile", "cannot read"]),
        ('{"PasswordEnv": "D2A_NO_SUCH_VAR_X"}', ["PasswordEnv", "D2A_NO_SUCH_VAR_X"]),
        ('{"Port": 5672,,}', ["not valid JSON", "line 1"]),
        ("[1, 2]", ["one JSON object"]),
    ],
)
def test_errors_name_key_and_file(tmp_path: Path, body: str, words: list[str]) -> None:
    p = write(tmp_path, body)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg
    for w in words:
        assert w in msg


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothere.json does not exist"):
        load_config(tmp_path / "nothere.json")


def test_password_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret-from-file\n")
    cfg = load_config(write(tmp_path, '{"Password": "x", "PasswordFile": "pw"}'))
    assert cfg.password.reveal() == "s3cret-from-file"
    monkeypatch.setenv("D2A_TEST_PW", "s3cret-from-env")
    cfg = load_config(write(tmp_path, '{"PasswordEnv": "D2A_TEST_PW"}'))
    assert cfg.password.reveal() == "s3cret-from-env"
    assert "s3cret" not in repr(cfg)


def test_every_key_has_help_and_valid_default() -> None:
    for k in KEYS:
        assert k.help
        if k.name not in ("TlsCaFile",):
            assert k.validate(k.default) == k.default


def test_check_config_cli(tmp_path: Path) -> None:
    good = write(tmp_path, SEED)
    r = subprocess.run(
        [sys.executable, "-m", "dlms2amqp.cli.daemon", "-c", str(good), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "INDLMS" in r.stdout and '"test"' not in r.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"Prefetch": -1}')
    r = subprocess.run(
        [sys.executable, "-m", "dlms2amqp.cli.daemon", "-c", str(bad), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 78
    assert "Prefetch" in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr


def test_tls_defaults_to_amqps_port(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, '{"Tls": true}')).Port == 5671
    assert load_config(write(tmp_path, '{"Tls": true, "Port": 15671}')).Port == 15671
    assert load_config(write(tmp_path, "{}")).Port == 5672


def test_sample_config_sets_every_key_to_its_default() -> None:
    """etc/dlms2amqp.json documents every key once, with its real default.

    Only the paths of the systemd unit (DebugFile, StateDir) and Workers (whose default
    is the number of cores) may differ, as the file's header says.
    """
    import orjson

    sample = ROOT / "etc" / "dlms2amqp.json"
    raw = orjson.loads(strip_comments(sample.read_text()))
    assert sorted(raw) == sorted(k.name for k in KEYS)
    load_config(sample)  # validates every value
    differ = {k.name for k in KEYS if raw[k.name] != k.default}
    assert differ <= {"DebugFile", "StateDir", "Workers"}, differ

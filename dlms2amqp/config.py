# SPDX-License-Identifier: GPL-2.0-or-later
"""Daemon configuration: every key declared once, with its default, validator and help.

The file is the proof of concept's JSON (``//`` comments allowed, as in its README), so a
user's existing file keeps working; the added keys all have defaults.  The whole file is
validated at start and every error names the key and the file, because a field engineer
reads these messages on a console far from the code.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import orjson

from .errors import ConfigError
from .secret import Secret

Validator = Callable[[Any], Any]


def strip_comments(text: str) -> str:
    """Remove ``//`` line comments and ``/* */`` block comments outside JSON strings.

    A scanner rather than a regular expression, so that ``"amqps://host"`` survives.
    """
    out: list[str] = []
    i, n = 0, len(text)
    in_str = False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_str = False
            i += 1
            continue
        if c == '"':
            in_str = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            # keep line numbers right for the JSON error message
            chunk = text[i : n if j < 0 else j + 2]
            out.append("\n" * chunk.count("\n"))
            i = n if j < 0 else j + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


# --- validators -------------------------------------------------------------------------
def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    return v


def _nonempty(v: Any) -> str:
    v = _str(v)
    if not v.strip():
        raise ValueError("must not be empty")
    return v


def _int_range(lo: int, hi: int) -> Validator:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("must be a whole number")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return v

    return check


def _float_range(lo: float, hi: float) -> Validator:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("must be a number")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo:g} and {hi:g}")
        return float(v)

    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _choice(*choices: str) -> Validator:
    lowered = {c.lower(): c for c in choices}

    def check(v: Any) -> str:
        if not isinstance(v, str) or v.lower() not in lowered:
            raise ValueError("must be one of " + ", ".join(choices))
        return lowered[v.lower()]

    return check


def _queue_name(v: Any) -> str:
    v = _nonempty(v)
    if len(v.encode()) > 255:
        raise ValueError("must be at most 255 bytes")
    return v


def _host_list(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
        raise ValueError('must be a list of "host" or "host:port" strings')
    for x in v:
        host, _, port = x.strip().rpartition(":") if ":" in x else (x, "", "")
        if port and (not port.isdigit() or not 1 <= int(port) <= 65535 or not host):
            raise ValueError(f'entry "{x}" is not "host" or "host:port"')
    return [x.strip() for x in v]


def _port_list(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x.startswith("/") for x in v):
        raise ValueError('must be a list of device paths, e.g. ["/dev/ttyUSB0"]')
    return list(v)


def _policy(kind: str) -> Validator:
    """A list of AllowedHosts / AllowedSerialPorts entries, checked by the meter layer."""

    def check(v: Any) -> list[str]:
        from .meter import targets  # no Gurux in there; imported late to keep config light

        if not isinstance(v, list) or not all(isinstance(e, str) for e in v):
            raise ValueError('must be a list of strings, e.g. ["10.20.0.0/16"]')
        (targets.HostPolicy if kind == "hosts" else targets.SerialPolicy)(v)
        return list(v)

    return check


@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    validate: Validator
    help: str


_CPUS = os.cpu_count() or 1

#: Every configuration key, in the order of the example file.  The seed's keys come first.
KEYS: tuple[Key, ...] = (
    Key("HostName", "127.0.0.1", _nonempty, "host name or IP address of the RabbitMQ server"),
    Key("Port", 5672, _int_range(1, 65535), "port of the RabbitMQ server (default 5671 with Tls)"),
    Key("VirtualHost", "/", _nonempty, "virtual host on the RabbitMQ server"),
    Key("UserName", "guest", _nonempty, "user name on the RabbitMQ server"),
    Key(
        "Password",
        "guest",
        _str,
        "broker password; prefer PasswordFile or PasswordEnv over a readable config file",
    ),
    Key("DebugFile", "", _str, "log file (JSON lines); empty = log to standard error only"),
    Key("InQueue", "INDLMS", _queue_name, "queue the daemon takes requests from"),
    Key("OutQueue", "OUTDLMS", _queue_name, "queue replies are put on (unless reply_to)"),
    # --- added keys ---
    Key("Workers", _CPUS, _int_range(1, 256), "worker processes (default: number of cores)"),
    Key(
        "SessionsPerWorker",
        16,
        _int_range(1, 4096),
        "meter sessions run at once by each worker (threads)",
    ),
    Key(
        "Prefetch",
        0,
        _int_range(0, 65535),
        "unacknowledged requests the daemon holds; 0 = 2 x Workers x SessionsPerWorker",
    ),
    Key("RequestTimeout", 60.0, _float_range(1, 3600), "deadline of one request, seconds"),
    Key("FrameTimeout", 5.0, _float_range(0.1, 600), "wait for one meter frame, seconds"),
    Key(
        "IdleSessionTimeout",
        30.0,
        _float_range(0, 3600),
        "seconds a finished meter association stays open for reuse; 0 = no pooling",
    ),
    # --- where requests may make the gateway connect (meter/targets.py) ---
    Key(
        "AllowedHosts",
        ["*"],
        _policy("hosts"),
        "meters reachable by -h: CIDRs, host names, *.domain, ! to refuse; first match "
        'decides; ["*"] = anywhere',
    ),
    Key(
        "AllowedSerialPorts",
        ["*"],
        _policy("serial"),
        'serial ports reachable by -S: path globs (/dev/ttyUSB*); ["*"] = any tty device',
    ),
    Key("MetricsPort", 9640, _int_range(0, 65535), "Prometheus metrics port; 0 = off"),
    Key("MetricsAddress", "127.0.0.1", _nonempty, "address the metrics endpoint listens on"),
    Key(
        "StateDir",
        "state",
        _nonempty,
        "directory for invocation counters and recent replies (relative to this file)",
    ),
    Key("DateTimeFormat", "iso", _choice("iso", "dotnet"), "DateTime format in replies"),
    Key("LogLevel", "Info", _choice("Debug", "Info", "Warning", "Error"), "log level"),
    Key(
        "Trace",
        False,
        _bool,
        "log DLMS frames in hex; a Low password travels in clear inside them: debugging only",
    ),
    Key("Tls", False, _bool, "connect to the broker with TLS (amqps)"),
    Key("TlsCaFile", "", _str, "CA certificate file to verify the broker; empty = system CAs"),
    Key("TlsCertFile", "", _str, "client certificate file (optional)"),
    Key("TlsKeyFile", "", _str, "client private key file (optional)"),
    Key("TlsServerName", "", _str, "name expected in the broker certificate; default HostName"),
    Key("PasswordFile", "", _str, "file holding the broker password (first line)"),
    Key("PasswordEnv", "", _str, "environment variable holding the broker password"),
    Key("Heartbeat", 30, _int_range(0, 3600), "AMQP heartbeat, seconds; 0 = off"),
    Key(
        "BlockedConnectionTimeout",
        60.0,
        _float_range(1, 3600),
        "seconds the broker may block our publishes (memory/disk alarm) before reconnecting",
    ),
    Key("ReconnectMaxDelay", 30.0, _float_range(0.1, 3600), "longest wait between reconnects"),
    Key(
        "DeadLetterExchange",
        "",
        _str,
        "exchange for requests that cannot be answered; empty = InQueue + '.dlx'",
    ),
    Key("DeadLetterQueue", "", _str, "queue bound to it; empty = InQueue + '.dead'"),
    Key(
        "QueueType",
        "classic",
        _choice("classic", "quorum"),
        "type InQueue is declared with; quorum adds x-delivery-limit and safe dead-lettering",
    ),
    Key(
        "DeliveryLimit",
        5,
        _int_range(1, 1000),
        "deliveries of one request before it is dead-lettered as poison",
    ),
    Key("MaxBodyBytes", 65536, _int_range(256, 16 * 1024 * 1024), "largest request body"),
    # --- broker-side limits (issue 11: oversize replies) ---
    Key(
        "MaxReplyBytes",
        16 * 1024 * 1024,
        _int_range(1024, 512 * 1024 * 1024),
        "largest reply body published; a larger reply becomes a notok reply (or numbered "
        "parts when the request has SplitReply true); keep it below the broker's "
        "max_message_size (RabbitMQ default 128 MiB)",
    ),
    Key("ReplyStoreSize", 100000, _int_range(0, 10_000_000), "recent replies kept for dedup"),
    Key("ShutdownGrace", 30.0, _float_range(0, 3600), "seconds to finish work on SIGTERM"),
    Key(
        "WorkerTimeout",
        15.0,
        _float_range(1, 3600),
        "a worker process silent this long (no heartbeat) is killed and replaced",
    ),
    # --- bounds and state at rest (issue 11: memory, secrets at rest) ---
    Key(
        "MaxRows",
        50000,
        _int_range(0, 100_000_000),
        "profile rows one request may read (a year of quarter hours is 35040); 0 = no bound",
    ),
    Key(
        "ReplyStoreMaxBytes",
        512 * 1024 * 1024,
        _int_range(0, 1 << 40),
        "compressed bytes of replies kept for dedup (oldest go first); 0 = no byte bound",
    ),
    Key(
        "DeadLetterTTL",
        0,
        _int_range(0, 4_000_000),
        "seconds a dead letter is kept (x-message-ttl of DeadLetterQueue); 0 = for ever",
    ),
    # --- scale-out (docs/design.md "Scale-out") ---
    Key(
        "Partitions",
        0,
        _int_range(0, 1024),
        "partition queues for several daemons on one request stream (one owner per meter); "
        "0 = off: one daemon consumes InQueue",
    ),
    Key(
        "ClusterHosts",
        [],
        _host_list,
        'more broker nodes ("host" or "host:port"), tried in turn after HostName on reconnect',
    ),
    Key(
        "SerialPorts",
        [],
        _port_list,
        "serial ports on this host; requests for them come to this daemon (with Partitions)",
    ),
    Key(
        "SerialPortWait",
        30.0,
        _float_range(1, 3600),
        "seconds a request for a serial port no daemon owns waits before it is answered notok",
    ),
)

KEY_BY_NAME = {k.name: k for k in KEYS}


class Config:
    """Validated configuration; attribute names are the JSON keys."""

    def __init__(
        self,
        values: dict[str, Any],
        path: Optional[Path],
        password: Secret,
        given: frozenset[str] = frozenset(),
    ):
        self._values = values
        self.path = path
        self.password = password
        self.given = given  # the keys the file sets (the others have their defaults)
        # the values as plain attributes too: read on every request, and an attribute
        # found in __dict__ costs a fraction of a trip through __getattr__
        for name, value in values.items():
            if name not in self.__dict__ and not hasattr(type(self), name):
                self.__dict__[name] = value

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        shown = {k: v for k, v in self._values.items() if k != "Password"}
        return f"Config({self.path}, {shown})"

    def as_dict(self) -> dict[str, Any]:
        """Values without the password (for logs and --check-config)."""
        return {k: v for k, v in self._values.items() if k != "Password"}

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def resolve(self, value: str) -> Path:
        """A path from the file, relative to the file's directory (so systemd and a shell agree)."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.StateDir)

    @property
    def debug_file(self) -> Optional[Path]:
        return self.resolve(self.DebugFile) if self.DebugFile else None

    @property
    def prefetch(self) -> int:
        return self.Prefetch or min(65535, 2 * self.Workers * self.SessionsPerWorker)

    @property
    def dead_letter_exchange(self) -> str:
        return self.DeadLetterExchange or self.InQueue + ".dlx"

    @property
    def dead_letter_queue(self) -> str:
        return self.DeadLetterQueue or self.InQueue + ".dead"


def _where(path: Optional[Path]) -> str:
    return f" in {path}" if path else ""


def build_config(raw: dict[str, Any], path: Optional[Path] = None) -> Config:
    """Validate a decoded configuration object; errors name the key and the file."""
    values: dict[str, Any] = {}
    for name in raw:
        if name not in KEY_BY_NAME:
            close = [k for k in KEY_BY_NAME if k.lower() == str(name).lower()]
            close = close or difflib.get_close_matches(str(name), list(KEY_BY_NAME), 1, 0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"Unknown configuration key {name!s}{_where(path)}{hint}")
    for key in KEYS:
        if key.name in raw:
            try:
                values[key.name] = key.validate(raw[key.name])
            except ValueError as e:
                raise ConfigError(f"Configuration key {key.name}{_where(path)} {e}") from None
        else:
            values[key.name] = key.default
    if values["Tls"] and "Port" not in raw:
        values["Port"] = 5671  # the amqps port, unless the file says otherwise
    for name in ("DeadLetterExchange", "DeadLetterQueue"):
        if values[name] and len(values[name].encode()) > 255:
            raise ConfigError(f"Configuration key {name}{_where(path)} must be at most 255 bytes")
    cfg = Config(values, path, Secret(values["Password"]), frozenset(raw))
    cfg.password = _broker_password(cfg, raw)
    for name in ("TlsCaFile", "TlsCertFile", "TlsKeyFile"):
        if values[name] and not cfg.resolve(values[name]).is_file():
            raise ConfigError(
                f"Configuration key {name}{_where(path)}: file {cfg.resolve(values[name])}"
                " does not exist"
            )
    if bool(values["TlsCertFile"]) != bool(values["TlsKeyFile"]):
        raise ConfigError(f"TlsCertFile and TlsKeyFile{_where(path)} must be given together")
    return cfg


def _broker_password(cfg: Config, raw: dict[str, Any]) -> Secret:
    if cfg.PasswordFile and cfg.PasswordEnv:
        raise ConfigError(f"PasswordFile and PasswordEnv{_where(cfg.path)} exclude each other")
    if cfg.PasswordFile:
        pf = cfg.resolve(cfg.PasswordFile)
        try:
            lines = pf.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ConfigError(
                f"Configuration key PasswordFile{_where(cfg.path)}: cannot read {pf} ({e.strerror})"
            ) from None
        if not lines or not lines[0]:
            raise ConfigError(f"Configuration key PasswordFile{_where(cfg.path)}: {pf} is empty")
        return Secret(lines[0])
    if cfg.PasswordEnv:
        value = os.environ.get(cfg.PasswordEnv)
        if not value:
            raise ConfigError(
                f"Configuration key PasswordEnv{_where(cfg.path)}: environment variable "
                f"{cfg.PasswordEnv} is not set"
            )
        return Secret(value)
    return Secret(cfg.Password)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, decode and validate the configuration file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"Configuration file {p} does not exist") from None
    except OSError as e:
        raise ConfigError(f"Cannot read configuration file {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Configuration file {p} is not UTF-8 text") from None
    try:
        raw = orjson.loads(strip_comments(text))
    except orjson.JSONDecodeError as e:
        # orjson's message carries line and column, never values
        raise ConfigError(f"Configuration file {p} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Configuration file {p} must hold one JSON object {{...}}")
    return build_config(raw, p.resolve())


# --- warnings (issue 11, finding 12): legal settings that expose something ---------------
def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (no name resolution: a warning must not block)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


def config_warnings(cfg: Config) -> list[str]:
    """What a field engineer should fix although the daemon can run with it.

    Shown at start (log and standard error) and by ``--check-config``.
    """
    out: list[str] = []
    where = f" in {cfg.path}" if cfg.path else ""
    if (
        "Password" in cfg.given
        and not cfg.PasswordFile
        and not cfg.PasswordEnv
        and cfg.path is not None
        and _readable_by_others(cfg.path)
    ):
        out.append(
            f"the broker Password is written{where}, which every user of this host can read:"
            " move it to a PasswordFile (mode 0600) or PasswordEnv, or chmod o-r the file"
        )
    if cfg.PasswordFile and _readable_by_others(cfg.resolve(cfg.PasswordFile)):
        out.append(
            f"PasswordFile {cfg.resolve(cfg.PasswordFile)} can be read by every user of this"
            " host: chmod 0600 it (owner: the daemon's user)"
        )
    if not cfg.Tls and not is_loopback(cfg.HostName):
        out.append(
            f"the broker connection to {cfg.HostName} is plain AMQP: the broker password and"
            " every request's meter passwords and keys cross the network in clear; set Tls"
        )
    if cfg.MetricsPort and not is_loopback(cfg.MetricsAddress):
        out.append(
            f"the metrics endpoint listens on {cfg.MetricsAddress}:{cfg.MetricsPort}, not on"
            " loopback: anyone who reaches it sees the daemon's counters; set MetricsAddress"
            " 127.0.0.1 unless a firewall limits who can connect"
        )
    return out


def describe_keys() -> str:
    """Help text listing every key with its default (for --help-config)."""
    lines = []
    for k in KEYS:
        lines.append(f"  {k.name:<26} default {k.default!r}: {k.help}")
    return "\n".join(lines)

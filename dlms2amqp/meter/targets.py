# SPDX-License-Identifier: GPL-2.0-or-later
"""Where a request may make the gateway connect: one meter key per meter, and allow-lists.

Anyone who can publish a request chooses ``-h``/``-p`` and ``-S``.  This module turns
them into the target actually used, checks it against the ``AllowedHosts`` and
``AllowedSerialPorts`` settings, and gives one meter one key however it is spelt:

- an IP literal is normalised as the system's resolver reads it (``127.1``,
  ``0x7f.0.0.1`` and ``127.0.0.1`` are all 127.0.0.1; ``::FFFF:127.0.0.1`` is 127.0.0.1;
  IPv6 in its compressed lower-case form); the unspecified addresses (``0.0.0.0``,
  ``::``, which Linux connects to the local host) are refused;
- a host name is resolved (``getaddrinfo``; the first IPv4 address, else the first
  IPv6 one) and the gateway connects to that address only, so the address checked
  against ``AllowedHosts`` is the one connected to, and ``localhost`` is the same meter
  as ``127.0.0.1``;
- a serial port is keyed, checked and opened by its real path (symbolic links resolved).

Names are resolved by a small cache (``Resolver``); the daemon's master resolves off
its event loop (``AsyncResolver``), ``dlms2amqp-read`` in line.  Nothing here imports
Gurux or pika: the master uses it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

from ..errors import ConnectionStringError, MeterConnectionError, RequestError

if TYPE_CHECKING:
    from .connstring import ConnSettings

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: the longest host name DNS allows (RFC 1035), without a trailing dot
MAX_HOST_NAME = 253


class TargetRefused(RequestError):
    """The target is valid but a setting forbids it; the message names the setting."""


# --- host names and IP literals ---------------------------------------------------------
def ip_literal(text: str) -> Optional[IPAddress]:
    """The address an IP literal means (as ``connect`` would read it), or None for a name.

    IPv4 follows the resolver's ``inet_aton`` rules (``127.1``, hex and octal parts),
    IPv6 may be bracketed and carry a scope (``fe80::1%eth0``).
    """
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            v6 = ipaddress.IPv6Address(text)
        except ValueError:
            return None
        mapped = v6.ipv4_mapped
        return mapped if mapped is not None else v6
    try:
        return ipaddress.IPv4Address(text)  # the usual dotted quad: means what it says
    except ValueError:
        pass  # 127.1, 0x7f.1, 010.0.0.1 ...: as the resolver reads them
    try:
        info = socket.getaddrinfo(
            text, 1, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
        )
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return ipaddress.IPv4Address(info[0][4][0])


def host_name(value: str) -> str:
    """-h: a valid host name in lower case (IDN in its ASCII form), or ConnectionStringError."""
    text = value.strip()
    shown = text if len(text) <= 40 else text[:40] + "..."
    name = text[:-1] if text.endswith(".") else text
    try:
        ascii_name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        ascii_name = ""
    labels = ascii_name.split(".")
    if (
        not ascii_name
        or len(ascii_name) > MAX_HOST_NAME
        or any(not 1 <= len(label) <= 63 for label in labels)
        or any(not all(c.isalnum() or c in "-_" for c in label) for label in labels)
        or any(label.startswith("-") or label.endswith("-") for label in labels)
    ):
        raise ConnectionStringError(
            f"option -h: {shown!r} is not a host name or IP address (labels of 1 to 63 "
            f"letters, digits or hyphens, at most {MAX_HOST_NAME} characters in all)"
        )
    return ascii_name


def checked_address(addr: IPAddress, opt: str = "h") -> str:
    """The literal of an address the gateway may connect to (the unspecified one is not)."""
    if addr.is_unspecified:
        raise ConnectionStringError(
            f"option -{opt}: {addr} is not a meter address (it means 'this host')"
        )
    return str(addr)


def key_host(address: str) -> str:
    """An address as it stands in a meter key (IPv6 in brackets, as in a URL)."""
    return f"[{address}]" if ":" in address else address


# --- allow-lists ------------------------------------------------------------------------
class HostPolicy:
    """``AllowedHosts``: entries tried in order, the first that matches decides.

    An entry is ``*`` (anything), a CIDR or address (``10.20.0.0/16``, ``192.0.2.7``,
    ``fd00::/8``), a host name (``meter7.example.net``) or a name pattern
    (``*.meters.example.net``); ``!`` in front refuses what it matches.  A name entry
    matches the name given in ``-h``; a CIDR matches the address connected to, also when
    ``-h`` gave a name.  No entry matching: refused.
    """

    SETTING = "AllowedHosts"

    def __init__(self, entries: Sequence[str] = ("*",)):
        self.entries: list[tuple[bool, str, Optional[IPNetwork]]] = []
        for raw in entries:
            if not isinstance(raw, str) or not raw.strip():
                raise ValueError("entries must be non-empty strings")
            text = raw.strip()
            deny = text.startswith("!")
            body = text[1:].strip() if deny else text
            if body == "*":
                self.entries.append((deny, "*", None))
                continue
            try:
                net = ipaddress.ip_network(body.strip("[]"), strict=False)
            except ValueError:
                net = None
            if net is not None:
                self.entries.append((deny, "", net))
                continue
            pattern = body[2:] if body.startswith("*.") else body
            try:
                name = host_name(pattern)
            except ConnectionStringError:
                raise ValueError(
                    f"entry {raw!r} is not *, a CIDR (10.0.0.0/8), a host name or *.domain"
                ) from None
            self.entries.append((deny, ("*." if body.startswith("*.") else "") + name, None))
        self.allow_all = bool(self.entries) and self.entries[0][:2] == (False, "*")

    def allows(self, name: Optional[str], address: str) -> bool:
        """``name``: the host name given (None for a literal); ``address``: connected to."""
        if self.allow_all:
            return True
        addr = ipaddress.ip_address(address.split("%")[0])
        for deny, pattern, net in self.entries:
            if net is not None:
                hit = addr.version == net.version and addr in net
            elif pattern == "*":
                hit = True
            elif name is None:
                hit = False
            elif pattern.startswith("*."):
                hit = name.endswith(pattern[1:])
            else:
                hit = name == pattern
            if hit:
                return not deny
        return False

    def check(self, name: Optional[str], address: str, port: Optional[int]) -> None:
        if not self.allows(name, address):
            shown = f"{name} ({address})" if name else address
            raise TargetRefused(
                f"host {shown} port {port} is refused by the {self.SETTING} setting"
            )


class SerialPolicy:
    """``AllowedSerialPorts``: glob patterns (``/dev/ttyUSB*``, ``/dev/serial/by-id/*``).

    A port is allowed when its path as given (normalised) or its real path matches one
    pattern; ``*`` alone allows every path.  ``*`` does not cross a ``/``.
    """

    SETTING = "AllowedSerialPorts"

    def __init__(self, patterns: Sequence[str] = ("*",)):
        self.patterns: list[str] = []
        for raw in patterns:
            if not isinstance(raw, str) or not raw.strip():
                raise ValueError("entries must be non-empty strings")
            text = raw.strip()
            if text != "*" and not text.startswith("/"):
                raise ValueError(f"entry {raw!r} must be an absolute path pattern or *")
            self.patterns.append(text)
        self.allow_all = "*" in self.patterns

    def allows(self, given: str, real: str) -> bool:
        if self.allow_all:
            return True
        paths = {os.path.normpath(given), real} if given.startswith("/") else {real}
        return any(PurePosixPath(p).match(pat) for p in paths for pat in self.patterns)

    def check(self, given: str, real: str) -> None:
        if not self.allows(given, real):
            shown = given if given == real else f"{given} ({real})"
            raise TargetRefused(f"serial port {shown} is refused by the {self.SETTING} setting")


ALLOW_ALL_HOSTS = HostPolicy()
ALLOW_ALL_SERIAL = SerialPolicy()


# --- name resolution --------------------------------------------------------------------
def resolve_name(name: str, port: int) -> str:
    """Blocking lookup: the first IPv4 address of ``name``, else its first IPv6 address."""
    try:
        infos = socket.getaddrinfo(name, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MeterConnectionError(
            f"cannot resolve host name {name}: {exc.strerror or exc}"
        ) from None
    except (UnicodeError, ValueError):
        raise MeterConnectionError(f"cannot resolve host name {name}") from None
    found = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET]
    found += [str(i[4][0]) for i in infos if i[0] == socket.AF_INET6]
    if not found:
        raise MeterConnectionError(f"host name {name} has no IPv4 or IPv6 address")
    addr: IPAddress = ipaddress.ip_address(found[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        raise MeterConnectionError(f"host name {name} resolves to {addr}, not a meter address")
    return str(addr)


class Resolver:
    """Bounded cache in front of ``resolve_name``: answers for ``ttl`` s, failures for 5 s."""

    def __init__(self, ttl: float = 60.0, size: int = 4096, negative_ttl: float = 5.0,
                 lookup: Callable[[str, int], str] = resolve_name):  # fmt: skip
        self.ttl, self.size, self.negative_ttl, self.lookup = ttl, size, negative_ttl, lookup
        self._cache: OrderedDict[str, tuple[float, Union[str, MeterConnectionError]]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    def cached(self, name: str) -> Union[str, MeterConnectionError, None]:
        """The cached answer (an address or the error), None when unknown or expired."""
        with self._lock:
            hit = self._cache.get(name)
            if hit is None:
                return None
            if hit[0] < time.monotonic():
                del self._cache[name]
                return None
            self._cache.move_to_end(name)
            return hit[1]

    def store(self, name: str, answer: Union[str, MeterConnectionError]) -> None:
        ttl = self.negative_ttl if isinstance(answer, MeterConnectionError) else self.ttl
        with self._lock:
            self._cache[name] = (time.monotonic() + ttl, answer)
            self._cache.move_to_end(name)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)

    def resolve(self, name: str, port: int) -> str:
        """Blocking, through the cache (dlms2amqp-read, tests)."""
        answer = self.cached(name)
        if answer is None:
            try:
                answer = self.lookup(name, port)
            except MeterConnectionError as exc:
                answer = exc
            self.store(name, answer)
        if isinstance(answer, MeterConnectionError):
            raise MeterConnectionError(answer.message)
        return answer


# --- the whole check --------------------------------------------------------------------
def needs_lookup(settings: ConnSettings) -> bool:
    """True when the target is a host name not resolved yet (the master resolves it first)."""
    return settings.serial_port is None and settings.address is None


def prepare(
    settings: ConnSettings,
    hosts: HostPolicy = ALLOW_ALL_HOSTS,
    serial: SerialPolicy = ALLOW_ALL_SERIAL,
    address: Optional[str] = None,
    resolver: Optional[Resolver] = None,
) -> None:
    """Fix the target of ``settings`` and check it; raises a GatewayError.

    Sets ``settings.address`` (from ``address``, a resolved name, or the literal given)
    and ``settings.serial_device`` (the real path), which the meter key and the media
    use, then applies the policies: a refusal is a ``TargetRefused`` naming the setting.
    """
    s = settings
    if s.serial_port is not None:
        real = os.path.realpath(s.serial_port)
        serial.check(s.serial_port, real)
        s.serial_device = real
        s.target_checked = True
        return
    assert s.host is not None and s.port is not None  # parse_connection_string checked
    if address is not None:
        s.address = address
    elif s.address is None:
        s.address = (resolver or _default_resolver).resolve(s.host, s.port)
    hosts.check(None if s.host_is_literal else s.host, s.address, s.port)
    s.target_checked = True


_default_resolver = Resolver()


class AsyncResolver:
    """Host names resolved off the caller's thread (the master's event loop never waits).

    ``lookup(name, port, done)`` answers from the cache at once, or runs the lookup in
    one of ``threads`` threads and hands ``done(address_or_error)`` to ``post`` (the
    IOLoop's ``add_callback_threadsafe``); after ``timeout`` s without an answer ``done``
    gets an error (the thread may stay stuck in the system resolver; the pool is small
    and bounded, and cached names are unaffected).
    """

    def __init__(
        self,
        post: Callable[[Callable[[], None]], None],
        call_later: Callable[[float, Callable[[], None]], object],
        timeout: float = 10.0,
        threads: int = 4,
        resolver: Optional[Resolver] = None,
    ):
        self.post = post
        self.call_later = call_later
        self.timeout = timeout
        self.resolver = resolver or Resolver()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="resolve")

    def lookup(
        self, name: str, port: int, done: Callable[[Union[str, MeterConnectionError]], None]
    ) -> None:
        answer = self.resolver.cached(name)
        if answer is not None:
            done(answer)
            return
        state = {"open": True}

        def finish(result: Union[str, MeterConnectionError]) -> None:  # on the loop thread
            if state["open"]:
                state["open"] = False
                done(result)

        def work() -> None:  # in a resolver thread
            try:
                result: Union[str, MeterConnectionError] = self.resolver.lookup(name, port)
            except MeterConnectionError as exc:
                result = exc
            except Exception:  # noqa: BLE001 - the loop must hear back whatever happens
                result = MeterConnectionError(f"cannot resolve host name {name}")
            self.resolver.store(name, result)
            self.post(lambda: finish(result))

        self.pool.submit(work)
        self.call_later(
            self.timeout,
            lambda: finish(
                MeterConnectionError(f"host name {name} did not resolve within {self.timeout:g} s")
            ),
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

"""Which address this instance advertises in the catalog.

ASGI and WSGI servers do not tell the app the port they listen on (uvicorn even binds only after
the lifespan startup), so it is found off the request path, in this order:

1. ``MESH_ADVERTISE`` / ``advertise=`` (``host:port`` or ``[v6]:port``), when set;
2. the process's own listening TCP sockets: the socket inodes open in ``/proc/self/fd``,
   matched against ``/proc/self/net/tcp`` and ``tcp6`` in state ``0A`` (LISTEN). Gunicorn
   workers inherit the master's socket, so each worker finds the same one;
3. the address a first request arrived on (ASGI ``scope["server"]``, WSGI ``SERVER_NAME`` and
   ``SERVER_PORT``), handed over by the middleware without blocking.

A wildcard bind (``0.0.0.0``, ``::``) is advertised as ``127.0.0.1``: the process cannot know
which of the host's addresses its callers can reach, and loopback is right for one machine.
Anything else needs ``MESH_ADVERTISE``.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from mesh_middleware.loopback import is_loopback_host

__all__ = [
    "AddressFinder",
    "Advertised",
    "Listener",
    "advertise_host",
    "choose_listener",
    "instance_id",
    "listening_sockets",
    "parent_holds_sockets",
    "parse_advertise",
    "socket_inodes",
]

_LISTEN = "0A"
_WILDCARDS = frozenset({"0.0.0.0", "::"})
_INSTANCE_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


@dataclass(frozen=True, slots=True)
class Listener:
    """A listening TCP socket of this process."""

    host: str
    port: int
    inode: int


@dataclass(frozen=True, slots=True)
class Advertised:
    """The address registered, and how it was found."""

    host: str
    port: int
    source: str
    inodes: frozenset[int] = frozenset()


def socket_inodes(proc: str | Path = "/proc/self") -> set[int]:
    """Inodes of the sockets a process has open (empty when ``/proc`` cannot be read)."""
    fd_dir = Path(proc) / "fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return set()
    inodes: set[int] = set()
    for name in names:
        try:
            target = os.readlink(fd_dir / name)
        except OSError:  # closed while we looked
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.add(int(target[8:-1]))
    return inodes


def _ipv4(hex_address: str) -> str:
    # The kernel prints the address as a native-endian 32-bit word.
    return socket.inet_ntop(socket.AF_INET, struct.pack("=I", int(hex_address, 16)))


def _ipv6(hex_address: str) -> str:
    words = [int(hex_address[i : i + 8], 16) for i in range(0, 32, 8)]
    return socket.inet_ntop(socket.AF_INET6, struct.pack("=4I", *words))


def listening_sockets(proc: str | Path = "/proc/self") -> list[Listener]:
    """The TCP sockets a process listens on (empty where ``/proc`` is not available)."""
    inodes = socket_inodes(proc)
    if not inodes:
        return []
    found: list[Listener] = []
    for table, decode in (("tcp", _ipv4), ("tcp6", _ipv6)):
        try:
            lines = (Path(proc) / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            inode = int(fields[9])
            if inode not in inodes:
                continue
            hex_address, _, hex_port = fields[1].partition(":")
            try:
                found.append(Listener(decode(hex_address), int(hex_port, 16), inode))
            except (ValueError, OSError, struct.error):
                continue
    return found


def choose_listener(listeners: list[Listener], prefer_port: int | None = None) -> Listener | None:
    """The socket to advertise when a process listens on several.

    The port a request already arrived on wins; then sockets reachable from other hosts over
    loopback-only ones (an app's own metrics or debug listener is often on loopback), IPv4 over
    IPv6, and the lower port.
    """
    if not listeners:
        return None
    return min(
        listeners,
        key=lambda s: (s.port != prefer_port, is_loopback_host(s.host), ":" in s.host, s.port),
    )


def advertise_host(host: str) -> str:
    """The host to advertise for a bound address: wildcards become ``127.0.0.1``."""
    if host in _WILDCARDS or not host:
        return "127.0.0.1"
    if host.startswith("::ffff:") and "." in host:  # IPv4-mapped
        return host[7:]
    return host


def parse_advertise(value: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6]:port``; raise ``ValueError`` saying what is expected."""
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536 or " " in host:
        raise ValueError(f"MESH_ADVERTISE must be 'host:port' or '[v6]:port', got {value!r}")
    return host, int(port_text)


def instance_id(service: str, host: str, port: int) -> str:
    """``{service}-{host}-{port}``, restricted to the characters an instance id may hold.

    Derived from the address rather than the pid, so the workers of one gunicorn master,
    which share its socket, all register and renew the same instance.
    """
    return _INSTANCE_ID_UNSAFE.sub("-", f"{service}-{host}-{port}")[:128]


def parent_holds_sockets(inodes: set[int] | frozenset[int], parent: int | None = None) -> bool:
    """Whether the parent process has one of these sockets open too (a pre-fork server)."""
    ppid = os.getppid() if parent is None else parent
    if ppid <= 1 or not inodes:
        return False
    return not inodes.isdisjoint(socket_inodes(f"/proc/{ppid}"))


class AddressFinder:
    """Finds, once, the address this instance advertises (see the module docstring)."""

    def __init__(self, advertise: tuple[str, int] | None = None, proc: str = "/proc/self") -> None:
        self._override = advertise
        self._proc = proc
        self._hint: tuple[str, int] | None = None
        self.found: Advertised | None = None

    def hint(self, host: object, port: object) -> None:
        """The address a request arrived on; no I/O, never raises (called on a request)."""
        if self._hint is not None or not isinstance(host, str) or not host:
            return
        try:
            number = int(port)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return
        if 0 < number < 65536:
            self._hint = (host, number)

    def resolve(self) -> Advertised | None:
        """The address to advertise, or ``None`` while none is known (poll again later)."""
        if self.found is not None:
            return self.found
        hint = self._hint
        if self._override is not None:
            host, port = self._override
            self.found = Advertised(host, port, "MESH_ADVERTISE")
            return self.found
        listeners = listening_sockets(self._proc)
        chosen = choose_listener(listeners, hint[1] if hint else None)
        if chosen is not None:
            same = frozenset(s.inode for s in listeners if s.port == chosen.port)
            self.found = Advertised(
                advertise_host(chosen.host), chosen.port, "listening socket", same
            )
        elif hint is not None:
            self.found = Advertised(advertise_host(hint[0]), hint[1], "first request")
        return self.found

"""Which transport a connection gets: rules in the style of libsdp.conf.

One rule per line, first match wins::

    # use  TRANSPORT  ROLE    PROGRAM  ADDRESS[/PREFIX]:PORT[-PORT]
    use    sdp        server  *        198.18.0.0/15:*
    use    both       client  curl*    *:8000-8099
    use    tcp        *       *        *
    default both
    rdma-timeout 5

TRANSPORT is ``sdp`` (RDMA only), ``tcp`` (the kernel's TCP, untouched) or ``both`` (a
server listens on both, a client tries RDMA first and falls back to TCP). ROLE is
``server`` (bind+listen), ``client`` (connect) or ``*``. PROGRAM is a shell glob on the
program's name (a script's file name, or the module given to ``-m``). The last field is
``*`` or ``ADDRESS:PORTS`` where ADDRESS is ``*``, an address or a network (IPv6 in
brackets: ``[2001:2::/64]:*``) and PORTS is ``*``, a port or a range. ``default`` sets
what applies when no rule matches (``both`` if absent: try RDMA, never lose a connection);
``rdma-timeout`` bounds a ``both`` client's RDMA attempt (seconds), since a peer without
RDMA may leave the connection manager waiting for a reply that never comes.

A file is read from ``--config`` (``python -m usdp.run``), else ``$USDP_CONFIG``, else
``$XDG_CONFIG_HOME/usdp/rules.conf`` (``~/.config/usdp/rules.conf``). A line that does not
parse raises :class:`RulesError` naming the file and the line, because a rule silently
ignored would send traffic over a transport nobody asked for.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from usdp._config import rules_path_from_env

Use = Literal["sdp", "tcp", "both"]
Role = Literal["server", "client"]
_USES: tuple[Use, ...] = ("sdp", "tcp", "both")
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: How long a ``both`` client waits for RDMA before it falls back (seconds).
DEFAULT_RDMA_TIMEOUT = 5.0


class RulesError(ValueError):
    """A rules file (or text) has a line that does not parse; says which file and line."""

    def __init__(self, source: str, lineno: int, line: str, why: str) -> None:
        where = f"{source}:{lineno}: {why}: {line.strip()!r}" if lineno else f"{source}: {why}"
        super().__init__(where)
        self.source, self.lineno, self.why = source, lineno, why


@dataclass(frozen=True)
class Rule:
    """One ``use`` line; ``None`` network or ports mean any."""

    use: Use
    role: Role | None
    program: str
    network: _Network | None
    ports: tuple[int, int] | None
    where: str  # "file:line", for log lines that say why a transport was chosen

    def matches(self, role: Role, program: str, host: str, port: int) -> bool:
        if self.role is not None and self.role != role:
            return False
        if self.program != "*" and not fnmatch.fnmatchcase(program, self.program):
            return False
        if self.ports is not None and not self.ports[0] <= port <= self.ports[1]:
            return False
        if self.network is not None:
            try:
                addr = ipaddress.ip_address(_unwild(host).split("%", 1)[0])
            except ValueError:
                return False  # a name the caller did not resolve: only "*" matches it
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None \
                    and self.network.version == 4:
                addr = addr.ipv4_mapped
            if addr.version != self.network.version or addr not in self.network:
                return False
        return True


@dataclass(frozen=True)
class Decision:
    """What a rule set decided for one connection, and which line decided it."""

    use: Use
    where: str


@dataclass
class Rules:
    """An ordered rule list with a default; ``decide`` is first-match-wins."""

    rules: list[Rule] = field(default_factory=list)
    default: Use = "both"
    rdma_timeout: float = DEFAULT_RDMA_TIMEOUT
    source: str = "<built-in>"

    def decide(self, role: Role, program: str, host: str, port: int) -> Decision:
        for r in self.rules:
            if r.matches(role, program, host, port):
                return Decision(r.use, r.where)
        return Decision(self.default, f"{self.source}: default")


def _unwild(host: str) -> str:
    """The bind address "" means every address: match it as 0.0.0.0."""
    return host or "0.0.0.0"


def _parse_ports(text: str) -> tuple[int, int] | None:
    if text == "*":
        return None
    lo_s, sep, hi_s = text.partition("-")
    lo, hi = int(lo_s), int(hi_s) if sep else int(lo_s)
    if not (0 <= lo <= hi <= 65535):
        raise ValueError(f"port range {text} outside 0-65535 or reversed")
    return lo, hi


def _parse_target(text: str) -> tuple[_Network | None, tuple[int, int] | None]:
    if text == "*":
        return None, None
    if text.startswith("["):
        addr, close, rest = text[1:].partition("]")
        if not close or not rest.startswith(":"):
            raise ValueError("an IPv6 target is written [ADDRESS[/PREFIX]]:PORT")
        port = rest[1:]
    else:
        addr, colon, port = text.rpartition(":")
        if not colon:
            raise ValueError("the target is ADDRESS[/PREFIX]:PORT[-PORT] or *")
        if ":" in addr:
            raise ValueError("write an IPv6 address in brackets: [ADDRESS]:PORT")
    net = None if addr == "*" else ipaddress.ip_network(addr, strict=False)
    return net, _parse_ports(port)


def _parse_use(word: str) -> Use:
    for u in _USES:
        if word == u:
            return u
    raise ValueError(f"transport must be one of {', '.join(_USES)}, not {word!r}")


def parse(text: str, source: str = "<string>") -> Rules:
    """Parse rules text; ``source`` names it in errors and log lines."""
    rules = Rules(source=source)
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        try:
            if words[0] == "default":
                if len(words) != 2:
                    raise ValueError("expected: default sdp|tcp|both")
                rules.default = _parse_use(words[1])
            elif words[0] == "rdma-timeout":
                if len(words) != 2:
                    raise ValueError("expected: rdma-timeout SECONDS")
                rules.rdma_timeout = float(words[1])
                if not rules.rdma_timeout > 0:
                    raise ValueError("rdma-timeout must be positive")
            elif words[0] == "use":
                if len(words) != 5:
                    raise ValueError("expected: use sdp|tcp|both server|client|* PROGRAM "
                                     "ADDRESS[/PREFIX]:PORT[-PORT]|*")
                use = _parse_use(words[1])
                if words[2] not in ("server", "client", "*"):
                    raise ValueError(f"role must be server, client or *, not {words[2]!r}")
                role: Role | None = None
                if words[2] == "server":
                    role = "server"
                elif words[2] == "client":
                    role = "client"
                net, ports = _parse_target(words[4])
                rules.rules.append(Rule(use, role, words[3], net, ports,
                                        f"{source}:{lineno}"))
            else:
                raise ValueError(f"unknown keyword {words[0]!r} (use, default, rdma-timeout)")
        except ValueError as exc:
            raise RulesError(source, lineno, raw, str(exc)) from None
    return rules


def default_path() -> Path:
    """The per-user rules file (it need not exist)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "usdp" / "rules.conf"


def load(path: str | os.PathLike[str] | None = None) -> Rules:
    """Rules from ``path``, else ``$USDP_CONFIG``, else the per-user file, else built-in.

    A file named explicitly (argument or variable) must exist; the per-user one may not.
    """
    explicit = path if path is not None else rules_path_from_env()
    p = Path(explicit) if explicit is not None else default_path()
    if explicit is None and not p.exists():
        return Rules()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(str(p), 0, "", f"cannot read the rules file ({exc.strerror})") from exc
    return parse(text, str(p))

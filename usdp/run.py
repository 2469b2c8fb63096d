"""Run an unmodified Python program with its sockets on usdp where the rules say so.

    python -m usdp.run [--config FILE] [-v] PROGRAM.py [ARGS...]
    python -m usdp.run [--config FILE] [-v] -m MODULE [ARGS...]

What ``LD_PRELOAD=libsdp.so`` did for C programs: the socket module is patched
(``usdp.patch()``), then the program runs as ``python PROGRAM.py`` or ``python -m MODULE``
would run it (``runpy``, with ``sys.argv`` set to what the program expects). Rules come
from ``--config``, else ``$USDP_CONFIG``, else ``~/.config/usdp/rules.conf``, else the
built-in default (``both``). ``-v`` logs one line per connection saying which transport it
got; the ``USDP_*`` variables of ``usdp.Options.from_env`` (``USDP_RECV_BUFS``,
``USDP_ACK_TIMEOUT``, ...) tune every RDMA socket.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import runpy
import sys

from usdp import _patch, _rules
from usdp._config import Options


def options_from_env() -> Options:
    """The options of every RDMA socket of the program: ``Options.from_env()``, the one
    reader of ``USDP_*`` (ring sizes included), for programs we cannot pass them to."""
    return Options.from_env()


USAGE = """\
usage: python -m usdp.run [--config FILE] [-v] PROGRAM.py [ARGS...]
       python -m usdp.run [--config FILE] [-v] -m MODULE [ARGS...]

Run a Python program with its TCP sockets on usdp (RDMA) where the rules say so.
  --config FILE  rules file (default: $USDP_CONFIG, ~/.config/usdp/rules.conf, else
                 'default both': RDMA first, TCP when RDMA fails)
  -v, --verbose  log the transport of every connection to stderr
"""


@dataclasses.dataclass
class _Args:
    config: str | None = None
    verbose: bool = False
    module: str | None = None
    program: str | None = None
    rest: list[str] = dataclasses.field(default_factory=list)


def _parse(argv: list[str]) -> _Args:
    """Our options end at the program or ``-m MODULE``: the rest is the program's (which
    argparse cannot express: it would take the program's options as ours)."""
    a = _Args()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        if arg in ("-v", "--verbose"):
            a.verbose = True
        elif arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                a.config = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                i += 1
                a.config = argv[i]
            else:
                _usage_error("--config needs a FILE")
        elif arg == "-m" or (arg.startswith("-m") and len(arg) > 2):
            if len(arg) > 2:
                a.module = arg[2:]
            elif i + 1 < len(argv):
                i += 1
                a.module = argv[i]
            else:
                _usage_error("-m needs a MODULE")
            a.rest = argv[i + 1:]
            return a
        elif arg == "--":
            i += 1
            break
        elif arg.startswith("-"):
            _usage_error(f"unknown option {arg}")
        else:
            break
        i += 1
    if i >= len(argv):
        _usage_error("give PROGRAM.py or -m MODULE")
    a.program, a.rest = argv[i], argv[i + 1:]
    return a


def _usage_error(msg: str) -> None:
    sys.stderr.write(f"{USAGE}\npython -m usdp.run: error: {msg}\n")
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    ns = _parse(sys.argv[1:] if argv is None else argv)
    try:
        rules = _rules.load(ns.config)
        options = options_from_env()
    except (_rules.RulesError, ValueError) as exc:  # ValueError: a bad USDP_* value
        print(f"usdp.run: {exc}", file=sys.stderr)
        return 2
    if ns.verbose:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger = logging.getLogger("usdp")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    if ns.module is not None:
        name = ns.module
        sys.argv = [ns.module, *ns.rest]  # runpy puts the module's path in argv[0]
    else:
        assert ns.program is not None
        name = os.path.basename(ns.program)
        sys.argv = [ns.program, *ns.rest]
        sys.path[0] = os.path.dirname(os.path.abspath(ns.program))  # as python PROGRAM.py
    _patch.patch(rules, program=name, options=options)
    if ns.module is not None:
        runpy.run_module(ns.module, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CLI of the VM test bed (``scripts/rxe-vm``)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from usdptools.testbed import vm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/rxe-vm",
        description="Boot a throwaway qemu VM with an rxe device and run CMD in it, with "
        "the project root as working directory. The exit status is CMD's.",
    )
    ap.add_argument("--hosts", type=int, choices=(1, 2), default=1,
                    help="2 boots a second VM (host B) linked to host A")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before the VMs are "
                    "killed (exit status 124)")
    ap.add_argument("--peer", default=None, help="shell command run in the background on B")
    ap.add_argument("--out", type=Path, default=None,
                    help="a host directory mounted read-write at the same path in the guests "
                    "(USDP_OUT); default: results/ in the project")
    ap.add_argument("--mem", type=int, default=2048, help="MiB of guest memory in all")
    ap.add_argument("--prepare", action="store_true",
                    help="only download the kernel and build the initramfs")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.prepare:
        img = vm.ensure_image()
        print(f"kernel {img.kernel}\ninitramfs {img.initramfs}")
        return 0
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command given (put it after --)")
    out = args.out if args.out is not None else vm.PROJECT_ROOT / "results"
    t0 = time.monotonic()
    vm.raise_on_signals()
    try:
        rc = vm.run(cmd, hosts=args.hosts, peer=args.peer, timeout=args.timeout,
                    out_dir=out, mem_mb=args.mem)
    except vm.VMError as e:
        print(f"rxe-vm: {e}", file=sys.stderr)
        return 125
    except vm.Interrupted as e:  # the VMs are already dead: run() unwound through _kill
        vm.log(f"{signal.Signals(e.signum).name}: VMs stopped")
        return 128 + e.signum
    except KeyboardInterrupt:
        vm.log("interrupted: VMs stopped")
        return 128 + signal.SIGINT
    vm.log(f"exit status {rc} after {time.monotonic() - t0:.1f}s (boot included)")
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""The rxe test bed: a throwaway qemu VM for kernels without RDMA.

Theory of operation
-------------------
This machine's kernel (and CI's) is built without InfiniBand, so rxe cannot be loaded
here. We boot Debian's own 6.1 kernel under qemu instead, with a tiny busybox initramfs
holding only the modules rxe needs. The guest mounts the host's ``/`` read-only over
virtio-9p, puts a tmpfs overlay on top and chroots into it: the guest then runs the very
same venv, pyverbs and checkout as the host, with no image to build or keep in sync.

Facts measured on these machines that shape the choices below:

* ``/dev/kvm`` exists but is nested PVM: a stock kernel hangs after decompression under
  KVM, so we use TCG (``-accel tcg,thread=multi -cpu max``); boot to userspace ~15 s.
* ``crc32_generic`` must be loaded or rxe fails with "failed to init crc32 algorithm".
* Two rxe devices inside one guest do not talk to each other (6.1's rxe cannot move a
  device into another netns in exclusive mode), so a one-host VM runs client and server on
  the same rxe device; real cross-host tests use two VMs joined by qemu's socket netdev
  (``--hosts 2``). The link has no other NIC: nothing leaves the machine.

The checkout may live anywhere, ``/tmp`` included: the guest mounts fresh tmpfs on
``/tmp`` and ``/run``, so its init bind-mounts the checkout (``usdp.root=``) aside first
and back at the same path after.

Lifetime: a VM never outlives its launcher. qemu gets ``PR_SET_PDEATHSIG`` (SIGKILL when
the launcher dies, however it dies), and SIGTERM/SIGHUP/SIGINT unwind the launcher
through the code that kills qemu (``raise_on_signals``). Work dirs of SIGKILLed launchers
are removed by the next run.

Output: the guest's command writes stdout to ttyS1 and stderr to ttyS2; qemu connects those
serial ports to unix sockets we listen on, and we copy them to our own stdout/stderr as
they arrive. ttyS0 is the kernel console, kept in a log file for post-mortems. The exit
status comes back through a second, writable 9p share (the "control" directory).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: One exact kernel package, so every machine boots the same kernel. If Debian's mirror
#: drops it (its security updates replace ABI versions), we fall back to whatever the
#: ``linux-image-amd64`` meta-package depends on right now, and say so.
KERNEL_PACKAGE = "linux-image-6.1.0-56-amd64"

#: Modules the guest loads (with their modules.dep closure, dependencies first).
GUEST_MODULES = (
    "crc32_generic",
    "virtio_pci",
    "virtio_net",
    "9pnet_virtio",
    "9p",
    "overlay",
    "veth",
    "sch_netem",
    "ib_core",
    "rdma_rxe",
    "ib_uverbs",
    "rdma_ucm",
)

#: Addresses of the test link (198.18.0.0/15 is reserved for benchmarking, RFC 2544).
HOST_A_ADDR = "198.18.0.1"
HOST_B_ADDR = "198.18.0.2"
LINK_PREFIX = 24
RXE_DEV = "rxe0"

CACHE_DIR = Path(os.environ.get("USDP_CACHE", Path.home() / ".cache" / "usdp"))
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[rxe-vm] {msg}", file=sys.stderr, flush=True)


class VMError(RuntimeError):
    """The test bed itself failed (not the command run inside it)."""


# --------------------------------------------------------------------------- kernel


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initramfs: Path
    kver: str


def _run(cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


def _kernel_package() -> str:
    """The pinned package if the archive still has it, else the current one."""
    with contextlib.suppress(subprocess.CalledProcessError):
        out = _run(["apt-cache", "show", "--no-all-versions", KERNEL_PACKAGE]).stdout
        if f"Package: {KERNEL_PACKAGE}" in out:
            return KERNEL_PACKAGE
    out = _run(["apt-cache", "depends", "linux-image-amd64"]).stdout
    m = re.search(r"Depends:\s+(linux-image-6\.\d+\.\d+-\d+-amd64)\b", out)
    if not m:
        raise VMError(
            f"{KERNEL_PACKAGE} is not in the apt archive and linux-image-amd64 names no "
            "kernel; run 'apt-get update' (scripts/bootstrap does)"
        )
    log(f"{KERNEL_PACKAGE} is gone from the archive; using {m.group(1)} instead")
    return m.group(1)


def ensure_image() -> GuestImage:
    """Download the kernel package once and build the initramfs (cached, idempotent)."""
    pkg = _kernel_package()
    kver = pkg.removeprefix("linux-image-")
    root = CACHE_DIR / f"vm-{kver}"
    kernel = root / "vmlinuz"
    # One initramfs per version of the init script and module list, named by its hash:
    # checkouts of different versions share the cache (and may boot at the same time)
    # without rebuilding each other's image under a running qemu.
    want = f"{_init_script_version()} {' '.join(GUEST_MODULES)}"
    initramfs = root / f"initramfs-{hashlib.sha256(want.encode()).hexdigest()[:12]}.cpio"
    if kernel.exists() and initramfs.exists():
        return GuestImage(kernel, initramfs, kver)
    root.mkdir(parents=True, exist_ok=True)
    tree = root / "pkg"
    if not (tree / "boot" / f"vmlinuz-{kver}").exists():
        log(f"downloading {pkg} (once; cached under {root})")
        with tempfile.TemporaryDirectory(dir=root) as dl:
            _run(["apt-get", "download", pkg], cwd=dl)
            debs = list(Path(dl).glob("*.deb"))
            if len(debs) != 1:
                raise VMError(f"apt-get download {pkg} gave {debs}")
            shutil.rmtree(tree, ignore_errors=True)
            _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
        _run(["depmod", "-b", str(tree), kver])
    if not kernel.exists():
        tmp_kernel = root / f"vmlinuz.{os.getpid()}"
        shutil.copyfile(tree / "boot" / f"vmlinuz-{kver}", tmp_kernel)
        tmp_kernel.replace(kernel)
    tmp = root / f"{initramfs.name}.{os.getpid()}"
    _build_initramfs(tree, kver, tmp)
    tmp.replace(initramfs)  # atomic: a concurrent boot sees the old file or the whole new one
    return GuestImage(kernel, initramfs, kver)


def _module_closure(moddir: Path) -> list[str]:
    """Module paths (relative to moddir) in load order: dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(p).name.removesuffix(".ko").replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in deps[path]:
            visit(d)
        order.append(path)

    for name in GUEST_MODULES:
        if name not in by_name:
            raise VMError(f"module {name} not found in {moddir}")
        visit(by_name[name])
    return order


def _build_initramfs(tree: Path, kver: str, out: Path) -> None:
    moddir = tree / "lib" / "modules" / kver
    mods = _module_closure(moddir)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise VMError("busybox not found: install busybox-static (scripts/bootstrap does)")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "lower", "upper", "newroot", "mods"):
            (t / d).mkdir()
        shutil.copy2(busybox, t / "bin" / "busybox")
        for i, m in enumerate(mods):
            shutil.copy2(moddir / m, t / "mods" / f"{i:02d}-{Path(m).name}")
        init = t / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        files = subprocess.run(
            ["find", "."], cwd=t, check=True, capture_output=True
        ).stdout
        with out.open("wb") as f:
            subprocess.run(
                ["cpio", "-o", "-H", "newc", "--quiet"], cwd=t, input=files, stdout=f, check=True
            )


def _init_script_version() -> str:
    return hashlib.sha256(INIT_SCRIPT.encode()).hexdigest()[:12]


# The guest's PID 1. Parameters come on the kernel command line as usdp.*=value.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /mods/*.ko; do insmod "$m" || echo "init: insmod $m failed" > /dev/ttyS0; done
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^usdp\.$1=//p"; }
CTL=$(arg ctl); OUT=$(arg out); ROOT=$(arg root)
fail() { echo "init: $*" > /dev/ttyS2; echo 125 > /newroot$CTL/rc 2>/dev/null; reboot -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower \
  || fail "cannot mount host root"
mount -t tmpfs -o size=75% tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot \
  || fail "cannot mount overlay"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm /keep
mount -t devpts devpts /newroot/dev/pts
# The fresh tmpfs on /tmp and /run would hide a checkout that lives there: hold on to it
# with a bind mount made before, and put that back at the same path after.
mount --bind /newroot$ROOT /keep || fail "cannot bind the checkout $ROOT"
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
mkdir -p /newroot$ROOT
mount --bind /keep /newroot$ROOT || fail "cannot mount the checkout at $ROOT"
mkdir -p /newroot$CTL
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 ctl /newroot$CTL || fail "no ctl share"
if [ -n "$OUT" ]; then
  mkdir -p /newroot$OUT
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /newroot$OUT || fail "no out share"
fi
ip link set lo up
stty -F /dev/ttyS1 raw -echo
stty -F /dev/ttyS2 raw -echo
chroot /newroot /bin/sh $CTL/guest.sh > /dev/ttyS1 2> /dev/ttyS2 < /dev/null
echo $? > /newroot$CTL/rc
sync
reboot -f
"""


# --------------------------------------------------------------------------- running


@dataclass
class HostSpec:
    name: str  # "A" or "B"
    addr: str
    command: Sequence[str] | str  # argv (A) or a shell string (B's --peer)
    smp: int
    mem_mb: int
    netdev: list[str] = field(default_factory=list)  # extra qemu args for the link


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _guest_script(spec: HostSpec, hosts: int, env: dict[str, str]) -> str:
    """The script run in the guest's chroot: bring up rxe, then the command."""
    py = PROJECT_ROOT / ".venv" / "bin" / "python"
    if not py.exists():
        py = Path(sys.executable)
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    cmd = spec.command if isinstance(spec.command, str) else shlex.join(spec.command)
    if hosts == 1:
        up = f"{shlex.quote(str(py))} -m usdptools.testbed.rxe up --veth"
    else:
        up = f"{shlex.quote(str(py))} -m usdptools.testbed.rxe up --netdev eth0 --addr {spec.addr}"
    return f"""set -e
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
{"" if sys.stdout.isatty() else "export PY_COLORS=0 TERM=dumb"}
echo "[rxe-vm] host {spec.name}: userspace after $(cut -d' ' -f1 /proc/uptime)s" >&2
{exports}
cd {shlex.quote(str(PROJECT_ROOT))}
{up} >&2
set +e
{cmd}
"""


class _Relay:
    """Listen on a unix socket; qemu connects; copy bytes to a file object."""

    def __init__(self, path: Path, sink: int, prefix: bytes = b"") -> None:
        self.path = path
        self.sink = sink
        self.prefix = prefix
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.thread = threading.Thread(target=self._run, name=f"relay-{path.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        at_line_start = True
        with conn:
            while chunk := conn.recv(65536):
                if self.prefix:
                    out = bytearray()
                    for line in chunk.splitlines(keepends=True):
                        if at_line_start:
                            out += self.prefix
                        out += line
                        at_line_start = line.endswith(b"\n")
                    chunk = bytes(out)
                os.write(self.sink, chunk)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        self.sock.close()


@dataclass
class _Running:
    spec: HostSpec
    proc: subprocess.Popen[bytes]
    ctl: Path
    relays: list[_Relay]
    console: Path


def _qemu_binary() -> str:
    q = shutil.which("qemu-system-x86_64")
    if q is None:
        raise VMError("qemu-system-x86_64 not found: install qemu-system-x86 (scripts/bootstrap)")
    return q


def _start_host(
    image: GuestImage, spec: HostSpec, hosts: int, work: Path, out_dir: Path | None,
    env: dict[str, str],
) -> _Running:
    ctl = work / f"ctl-{spec.name}"
    ctl.mkdir()
    (ctl / "guest.sh").write_text(_guest_script(spec, hosts, env))
    prefix = b"" if spec.name == "A" else b"[B] "
    out_sink = sys.stdout.fileno() if spec.name == "A" else sys.stderr.fileno()
    relays = [
        _Relay(work / f"{spec.name}-out.sock", out_sink, prefix),
        _Relay(work / f"{spec.name}-err.sock", sys.stderr.fileno(), prefix),
    ]
    for r in relays:
        r.start()
    console = work / f"console-{spec.name}.log"
    cmdline = (
        f"console=ttyS0 quiet loglevel=3 panic=-1 usdp.ctl={ctl} usdp.root={PROJECT_ROOT}"
        + (f" usdp.out={out_dir}" if out_dir else "")
    )
    args = [
        _qemu_binary(), "-nodefaults", "-display", "none", "-no-reboot",
        "-accel", "tcg,thread=multi", "-cpu", "max",
        "-smp", str(spec.smp), "-m", str(spec.mem_mb),
        "-kernel", str(image.kernel), "-initrd", str(image.initramfs), "-append", cmdline,
        "-serial", f"file:{console}",
        "-serial", f"unix:{relays[0].path}",
        "-serial", f"unix:{relays[1].path}",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
        "multidevs=remap",
        "-virtfs", f"local,path={ctl},mount_tag=ctl,security_model=none",
        *spec.netdev,
    ]
    if out_dir:
        args += ["-virtfs", f"local,path={out_dir},mount_tag=out,security_model=none"]
    # qemu gets its own session (a Ctrl-C on the terminal is ours to handle, not its) but
    # dies with us: the kernel sends it SIGKILL when this thread's process dies, however
    # it dies (SIGKILL included), and our signal handlers kill it on SIGTERM/SIGINT/SIGHUP.
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent(os.getpid()))
    return _Running(spec, proc, ctl, relays, console)


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that ties the child's life to ``parent`` (PR_SET_PDEATHSIG)."""

    def child() -> None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: nobody will signal
            os._exit(1)

    return child


def _finish(run: _Running, deadline: float | None) -> int:
    """Wait for the guest to power off; return the command's exit status."""
    try:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        run.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"host {run.spec.name}: timed out; killing the VM")
        _kill(run)
        return 124
    for r in run.relays:
        r.join(5)
    rc_file = run.ctl / "rc"
    if not rc_file.exists():
        tail = run.console.read_text(errors="replace")[-3000:] if run.console.exists() else ""
        log(f"host {run.spec.name}: no exit status (qemu rc {run.proc.returncode}); console:\n"
            + tail)
        return 125
    return int(rc_file.read_text().strip() or 125)


def _kill(run: _Running) -> None:
    if run.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.proc.pid, 9)
        run.proc.wait()
    for r in run.relays:
        r.join(1)


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    _remove_orphaned_workdirs()
    # Short path: unix socket paths are limited to 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="usdp-vm-"))
    (d / "launcher.pid").write_text(str(os.getpid()))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _remove_orphaned_workdirs() -> None:
    """Work dirs of launchers that were SIGKILLed (their qemu died with them)."""
    for d in Path(tempfile.gettempdir()).glob("usdp-vm-*"):
        try:
            pid = int((d / "launcher.pid").read_text())
        except (OSError, ValueError):
            continue  # an older launcher's, or being created: not ours to judge
        if not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


class Interrupted(BaseException):
    """SIGTERM or SIGHUP reached the launcher: unwind (killing the VMs), then exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def raise_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into :class:`Interrupted` (SIGINT already raises
    KeyboardInterrupt), so that ``run``'s cleanup kills qemu before the launcher exits."""

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def run(
    command: Sequence[str],
    *,
    hosts: int = 1,
    peer: str | None = None,
    timeout: float | None = None,
    out_dir: Path | None = None,
    mem_mb: int = 2048,
) -> int:
    """Boot the test bed, run ``command`` on host A, return its exit status."""
    if hosts not in (1, 2):
        raise VMError("--hosts must be 1 or 2")
    if peer and hosts != 2:
        raise VMError("--peer needs --hosts 2")
    for what, path in (("the checkout", PROJECT_ROOT), ("--out", out_dir),
                       ("the temp dir", Path(tempfile.gettempdir()))):
        if path is not None and any(c.isspace() for c in str(path.resolve())):
            raise VMError(f"{what} path {str(path)!r} has whitespace, which the guest's "
                          "kernel command line cannot carry: use a path without it")
    t0 = time.monotonic()
    image = ensure_image()
    deadline = None if timeout is None else t0 + timeout
    env = {
        "USDP_HOST_A": HOST_A_ADDR,
        "USDP_HOST_B": HOST_B_ADDR,
        "USDP_HOST_A6": "2001:2::1",
        "USDP_HOST_B6": "2001:2::2",
        "USDP_RXE_DEV": RXE_DEV,
        "USDP_HOSTS": str(hosts),
        "USDP_IN_VM": "1",
        "USDP_BOOT_T0": repr(time.time()),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        out_dir = out_dir.resolve()
        env["USDP_OUT"] = str(out_dir)
    with _workdir() as work:
        if hosts == 1:
            a = HostSpec("A", HOST_A_ADDR, command, smp=2, mem_mb=mem_mb)
            ra = _start_host(image, a, 1, work, out_dir, {**env, "USDP_HOST": "A"})
            try:
                return _finish(ra, deadline)
            finally:
                _kill(ra)
        port = _free_port()
        mac = "52:54:00:12:34:{:02x}"
        a = HostSpec("A", HOST_A_ADDR, command, smp=1, mem_mb=mem_mb // 2, netdev=[
            "-netdev", f"socket,id=link,listen=127.0.0.1:{port}",
            "-device", f"virtio-net-pci,netdev=link,mac={mac.format(1)}",
        ])
        b = HostSpec("B", HOST_B_ADDR, peer or "sleep infinity", smp=1, mem_mb=mem_mb // 2,
                     netdev=[
            "-netdev", f"socket,id=link,connect=127.0.0.1:{port}",
            "-device", f"virtio-net-pci,netdev=link,mac={mac.format(2)}",
        ])
        with contextlib.ExitStack() as running:  # kills what was started, however we leave
            ra = _start_host(image, a, 2, work, out_dir, {**env, "USDP_HOST": "A"})
            running.callback(_kill, ra)
            # B connects to A's listening socket; give A's qemu a moment to listen.
            _wait_listening(port, ra)
            rb = _start_host(image, b, 2, work, out_dir, {**env, "USDP_HOST": "B"})
            running.callback(_kill, rb)
            return _finish(ra, deadline)


def _wait_listening(port: int, ra: _Running) -> None:
    """qemu's listen socket appears a little after exec; poll for it (bounded)."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if ra.proc.poll() is not None:
            raise VMError("host A's qemu exited during start-up")
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                             text=True).stdout
        if out.strip():
            return
        time.sleep(0.05)  # polling an external process's state: no event to wait on
    raise VMError("host A's qemu did not open its link socket")

"""Run a command inside a QEMU TCG guest of the test kernel, with /dev/vhost-vdpa-0 backed by vdpa_sim_net.

The guest's root is the host's / over virtio-9p, read-only, so the command sees the same checkout, venv and
Python as the host (the 9p `cache=loose` mode makes Python start 5-8x faster than `cache=none`; the price is
that host edits made during a boot may not be seen, which does not matter for one boot per command). A
per-run host directory is shared writable: the command's output and exit status come back through it, not
through the serial console, so nothing the command prints can be confused with kernel messages.

TCG only: /dev/kvm on the hosts this was built for is a PVM hypervisor that QEMU hangs or aborts on.

This is test-harness code: `run_in_kernel_vm` blocks (a pytest test or a shell calls it) and owns QEMU for
the whole call, killing its process group if the deadline passes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from vduproxy.log import get_logger

from .build import KernelImage, ensure_kernel

log = get_logger(__name__)

QEMU = "qemu-system-x86_64"
GUEST_JOB_DIR = "/run/vduproxy-job"
GUEST_OUT_DIR = f"{GUEST_JOB_DIR}/out"
DEFAULT_MAC = "02:00:00:00:a0:01"  # locally administered, so it cannot clash with a real NIC
DEFAULT_MTU = 1500
DEFAULT_MEMORY = "2G"
CONSOLE_TAIL_LINES = 40
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class KernelVmError(Exception):
    """The guest did not run the command to completion (QEMU missing or failed, guest setup failed, timeout).

    `console` is the tail of the guest's serial console, the first thing to read when this happens.
    """

    def __init__(self, message: str, *, console: str = "") -> None:
        super().__init__(message + (f"\n--- guest console (tail) ---\n{console}" if console else ""))
        self.console = console


class KernelVmSetupError(KernelVmError):
    """The guest booted but could not prepare the device (vdpa dev add, /dev/vhost-vdpa-0, memlock)."""


@dataclasses.dataclass(frozen=True)
class VmOptions:
    vdpa: bool = True  # create vdpa0 on vdpasim_net before the command; False for commands that need none
    mac: str = DEFAULT_MAC
    mtu: int = DEFAULT_MTU
    memory: str = DEFAULT_MEMORY


def guest_init_path() -> Path:
    path = Path(str(resources.files("vduproxy.testing.kernelvm").joinpath("guest-init.sh")))
    if not path.is_file():
        raise KernelVmError(f"guest init script missing: {path}")
    return path


def job_script(command: Sequence[str], env: Mapping[str, str], cwd: Path) -> str:
    """The shell script the guest runs: exports, cd, exec; every value shell-quoted."""
    lines = ["# written by vduproxy.testing.kernelvm.vm", "export PYTHONDONTWRITEBYTECODE=1"]
    lines.append(f"export VDUPROXY_VM_OUT={shlex.quote(GUEST_OUT_DIR)}")
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"not a valid environment variable name: {name!r}")
        lines.append(f"export {name}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(str(cwd))} || exit 125")
    lines.append("exec " + shlex.join(command))
    return "\n".join(lines) + "\n"


def _qemu_argv(kernel: Path, init: Path, job: Path, memory: str) -> list[str]:
    for p in (init, job):
        # The kernel command line and QEMU's -virtfs option both split on these.
        if any(c in str(p) for c in " \t\n,"):
            raise KernelVmError(f"path unusable on a kernel command line or -virtfs: {str(p)!r}")
    append = " ".join(
        [
            "console=ttyS0 panic=-1 quiet loglevel=4",
            "root=hostroot rootfstype=9p ro",
            "rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose",
            # init=/bin/sh with the script as its argument (everything after "--" goes to init): the script
            # does not need its exec bit, which a package install may not keep.
            f"init=/bin/sh -- {init}",
        ]
    )
    return [
        QEMU,
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", "1",
        "-m", memory,
        "-display", "none",
        "-monitor", "none",
        "-serial", f"file:{job / 'console.log'}",
        "-no-reboot",
        "-kernel", str(kernel),
        "-append", append,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={job},mount_tag=vduproxyjob,security_model=none",
        "-device", "virtio-rng-pci",
        "-net", "none",
    ]  # fmt: skip


def _tail(path: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])


def run_in_kernel_vm(
    command: Sequence[str],
    *,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    kernel: KernelImage | None = None,
    options: VmOptions = VmOptions(),  # frozen, so one shared default instance is safe
    outdir: Path | None = None,
) -> tuple[int, str]:
    """Boot the test kernel, run `command` as root in `cwd` (default: the current directory), return
    (exit status, combined stdout and stderr).

    The guest environment is a minimal one (PATH, HOME, LANG, PYTHONDONTWRITEBYTECODE) plus `env`; the
    command sees `/dev/vhost-vdpa-0` (unless `options.vdpa` is False), an unlimited RLIMIT_MEMLOCK, a tmpfs
    /tmp, and $VDUPROXY_VM_OUT, a writable directory whose files are copied to `outdir` afterwards.
    Raises ValueError for arguments the guest cannot honour (cwd /tmp itself, a bad variable name), and
    KernelVmError when the command could not be run to completion (the command failing is not an
    error: that is its exit status). A missing kernel is built first (about ten minutes).
    """
    if not command:
        raise ValueError("empty command")
    workdir = (Path(cwd) if cwd is not None else Path.cwd()).resolve()
    keep = ""
    if workdir == Path("/tmp"):
        # The guest mounts a tmpfs over /tmp (the root is read-only): /tmp itself cannot be the job's directory.
        raise ValueError(f"cwd {workdir} is /tmp itself, which the guest replaces with a tmpfs")
    if Path("/tmp") in workdir.parents:
        # a directory below it is bind-mounted back at its own path by the guest init
        keep = str(workdir)
    script = job_script(command, env or {}, workdir)
    if shutil.which(QEMU) is None:
        raise KernelVmError(f"{QEMU} not found (apt-get install qemu-system-x86)")
    init = guest_init_path()
    image = kernel if kernel is not None else ensure_kernel()
    with tempfile.TemporaryDirectory(prefix="vduproxy-kvm-") as tmp:
        job = Path(tmp)
        (job / "setup.env").write_text(
            f"VM_VDPA={int(options.vdpa)}\nVM_VDPA_MAC={shlex.quote(options.mac)}\nVM_VDPA_MTU={options.mtu}\n"
            f"VM_KEEP_DIR={shlex.quote(keep)}\n"
        )
        (job / "job.sh").write_text(script)
        (job / "out").mkdir()
        argv = _qemu_argv(image.bzimage, init, job, options.memory)
        rc = _run_qemu(argv, job, timeout)
        console = _tail(job / "console.log")
        setup_error = job / "setup-error"
        if setup_error.is_file():
            raise KernelVmSetupError(setup_error.read_text().strip(), console=console)
        rc_file = job / "rc"
        if not rc_file.is_file():
            raise KernelVmError(
                f"the guest stopped before the command finished (QEMU exit status {rc}); "
                f"QEMU said: {_tail(job / 'qemu.log', 10) or '(nothing)'}",
                console=console,
            )
        status = int(rc_file.read_text().strip())
        output = (job / "output").read_bytes().decode(errors="replace")
        if outdir is not None:
            shutil.copytree(job / "out", outdir, dirs_exist_ok=True)
        return status, output


def _run_qemu(argv: list[str], job: Path, timeout: float) -> int:
    start = time.monotonic()
    log.info("booting kernel vm", job=str(job), timeout_s=timeout)
    with (job / "qemu.log").open("wb") as qlog:
        # Own session: on timeout the whole group goes, and nothing else on the host is signalled.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise KernelVmError(
                f"the guest did not finish within {timeout:.0f} s", console=_tail(job / "console.log")
            ) from None
        except BaseException:
            _kill(proc)
            raise
    log.info("kernel vm exited", qemu_rc=rc, elapsed_s=round(time.monotonic() - start, 1))
    return rc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()

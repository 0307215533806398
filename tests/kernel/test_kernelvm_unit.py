"""Tier 1 checks of the kernel-tier tooling that need no kernel and no VM: the cache key, the fragment, the
job script the guest runs, and the arguments refused before anything boots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vduproxy.testing.kernelvm import build, vm

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_shipped_fragment_builds_the_device_and_not_virtio_vdpa() -> None:
    symbols = build.parse_fragment(build.fragment_text())
    for sym in ("CONFIG_VDPA", "CONFIG_VDPA_SIM_NET", "CONFIG_VHOST_VDPA", "CONFIG_9P_FS", "CONFIG_EVENTFD"):
        assert symbols.get(sym) == "y", sym
    # virtio_vdpa would compete with vhost_vdpa for the new device.
    assert symbols.get("CONFIG_VIRTIO_VDPA", "n") == "n"


def test_fragment_with_a_bad_line_is_refused_with_its_line_number() -> None:
    with pytest.raises(build.KernelBuildError, match=r"vdpa.config:3: .*VDPA y"):
        build.parse_fragment("# comment\nCONFIG_VDPA=y\nVDPA y\n")


def test_cache_key_follows_source_version_and_fragment() -> None:
    base = build.cache_key("6.1.192-2", "CONFIG_VDPA=y\n")
    assert base == build.cache_key("6.1.192-2", "CONFIG_VDPA=y\n")
    assert base != build.cache_key("6.1.192-3", "CONFIG_VDPA=y\n")
    assert base != build.cache_key("6.1.192-2", "CONFIG_VDPA=y\nCONFIG_TUN=y\n")
    # Debian versions may hold epochs and tildes: the key is a single safe path component either way.
    odd = build.cache_key("1:6.1~rc1+b2/x", "")
    assert "/" not in odd and ":" not in odd and "~" not in odd


def test_cache_lives_under_vduproxy_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VDUPROXY_CACHE", str(tmp_path))
    assert build.cache_root() == tmp_path
    monkeypatch.delenv("VDUPROXY_CACHE")
    assert build.cache_root() == Path.home() / ".cache" / "vduproxy"


def test_missing_source_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "SOURCE_PACKAGE", "vduproxy-no-such-package")
    with pytest.raises(build.KernelBuildError, match="vduproxy-no-such-package is not installed"):
        build.ensure_kernel()


def test_job_script_keeps_arguments_and_environment_intact(tmp_path: Path) -> None:
    """The script is run by a real sh here: what the guest would execute, minus the guest."""
    awkward = 'it\'s $HOME `x` "q" \\ ;|&'
    command = [
        sys.executable,
        "-c",
        "import os, sys; print(os.getcwd()); print(sys.argv[1:]); print(os.environ['V'])",
    ]
    script = vm.job_script([*command, awkward, ""], {"V": awkward}, tmp_path)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [str(tmp_path), repr([awkward, ""]), awkward]


@pytest.mark.parametrize("name", ["", "1X", "A-B", "A B", "é"])
def test_job_script_refuses_names_a_shell_cannot_export(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="environment variable name"):
        vm.job_script(["true"], {name: "v"}, tmp_path)


def test_arguments_the_guest_cannot_honour_are_refused_before_booting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An empty PATH would make the QEMU lookup fail: these must be refused earlier than that.
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ValueError, match="empty command"):
        vm.run_in_kernel_vm([], cwd=REPO)
    with pytest.raises(ValueError, match="/tmp itself"):
        vm.run_in_kernel_vm(["true"], cwd="/tmp")
    with pytest.raises(vm.KernelVmError, match="qemu-system-x86_64 not found"):
        vm.run_in_kernel_vm(["true"], cwd=REPO)

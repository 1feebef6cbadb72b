"""Host tests of the systemd guest's runner (no VM): the image cache key and the QEMU command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm import system_vm


def _inputs(directory: Path, packages: str) -> None:
    for name in system_vm.IMAGE_INPUTS:
        (directory / name).write_text(f"# {name}\n")
    (directory / "packages.txt").write_text(packages)


def test_image_key_follows_the_package_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system_vm, "SYSTEM", tmp_path)
    _inputs(tmp_path, "systemd\n")
    first = system_vm.image_key()
    assert system_vm.image_key() == first
    _inputs(tmp_path, "systemd\nfio\n")
    assert system_vm.image_key() != first


def test_image_key_follows_the_build_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system_vm, "SYSTEM", tmp_path)
    _inputs(tmp_path, "systemd\n")
    first = system_vm.image_key()
    (tmp_path / "build-image.sh").write_text("# changed\n")
    assert system_vm.image_key() != first


def test_the_real_inputs_exist() -> None:
    for name in system_vm.IMAGE_INPUTS:
        assert (system_vm.SYSTEM / name).is_file(), name
    packages = (system_vm.SYSTEM / "packages.txt").read_text()
    for needed in ("systemd", "linux-image-amd64", "open-iscsi", "multipath-tools", "python3-rtslib-fb", "fio"):
        assert f"\n{needed}\n" in packages, needed


def test_qemu_boots_the_image_kernel_with_systemd_and_no_kvm(tmp_path: Path) -> None:
    machine = system_vm.Machine(system_vm.Image(tmp_path / "image"), tmp_path / "work")
    argv = machine.qemu_argv()
    append = argv[argv.index("-append") + 1]
    assert "init=/lib/systemd/systemd" in append and "root=/dev/vda" in append
    assert "q35,accel=tcg" in argv
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "work" / "vmlinuz")
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert [d.split(",")[0] for d in drives] == [f"file={tmp_path / 'work' / 'root.img'}",
                                                 f"file={tmp_path / 'work' / 'array.img'}"]
    assert f"mount_tag={system_vm.SHARE_TAG}" in " ".join(argv)


def _deb(tmp_path: Path, depends: str) -> Path:
    import subprocess

    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: t\nVersion: 1\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: t\n"
        f"Depends: {depends}\n")
    subprocess.run(["dpkg-deb", "-b", "--root-owner-group", str(root), str(tmp_path / "t.deb")], check=True,
                   capture_output=True)
    return tmp_path / "t.deb"


@pytest.mark.skipif(not __import__("shutil").which("dpkg-deb"), reason="needs dpkg-deb")
def test_missing_dependencies_names_what_the_offline_guest_lacks(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.mkdir()
    (image / "manifest.txt").write_text("kernel 6.1.0-57-amd64\npython3 3.11.2-1\nopen-iscsi 2.1.8-1\n")
    deb = _deb(tmp_path, "python3:any (>= 3.11~), open-iscsi, python3-numpy (>= 1:1.24), foo | open-iscsi")
    assert system_vm.missing_dependencies(deb, system_vm.Image(image)) == ["python3-numpy (>= 1:1.24)"]


def test_the_readme_install_steps_give_the_scenario_its_commands() -> None:
    """The systemd guest runs the README's blocks as written: this pins what it expects to find there."""
    from tests.vm.system.readme_steps import commands, fill, install_steps

    steps = install_steps((system_vm.REPO / "README.md").read_text())
    assert ["apt", "install", "./dist/switch-agent_*.deb"] in commands(steps[1][0], cwd="/nonexistent")
    assert "find_multipaths no" in steps[2][0] and steps[2][0].startswith("defaults {")
    assert ["systemctl", "enable", "--now", "switch-agent.socket", "switch-agent"] in commands(steps[3][0])
    login = commands(steps[4][0], portal="192.0.2.1", iqn="iqn.2026-11.org.example:v")
    assert login[0] == ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", "192.0.2.1"]
    assert ["iscsiadm", "-m", "node", "-T", "iqn.2026-11.org.example:v", "--login"] in login
    fstab = fill(steps[5][0], wwid="36001").split()
    assert fstab[:3] == ["/dev/switch-agent/switch-36001", "/srv/volume", "ext4"] and "_netdev" in fstab[3]
    assert ["mount", "/srv/volume"] in commands(steps[5][1], wwid="36001")


def test_readme_steps_refuse_a_placeholder_left_unfilled(tmp_path: Path) -> None:
    from tests.vm.system.readme_steps import ReadmeError, commands

    (tmp_path / "a_1.deb").write_text("")
    assert commands("apt install ./a_*.deb  # <comment> is dropped\n", cwd=str(tmp_path)) == [
        ["apt", "install", "./a_1.deb"]]
    with pytest.raises(ReadmeError, match="iqn"):
        commands("iscsiadm -T <iqn> --login\n", portal="x")

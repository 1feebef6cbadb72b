"""Host tests of the guest kernel choice (tests/vm/guest_kernels.py): no VM, no network."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm import guest_kernels as gk


def make_boot(tmp_path: Path, *releases: str) -> Path:
    boot = tmp_path / "boot"
    boot.mkdir()
    for r in releases:
        (boot / f"vmlinuz-{r}").write_bytes(b"kernel")
    return boot


def make_cached(cache: Path, name: str, release: str, *, usr: bool = False, modules: tuple[str, ...] = ()) -> Path:
    root = cache / release
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{release}").write_bytes(b"kernel")
    moddir = root / ("usr/lib" if usr else "lib") / "modules" / release
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text("".join(f"kernel/x/{m}.ko.xz: \n" for m in modules))
    (moddir / "modules.builtin").write_text("kernel/fs/configfs/configfs.ko\n")
    (cache / name).symlink_to(release)
    return moddir


DEPENDS_61 = "linux-image-6.1.0-57-amd64 (= 6.1.140-1)"


def test_the_default_stays_the_pinned_6_1_when_a_newer_kernel_lands_in_boot(tmp_path: Path) -> None:
    boot = make_boot(tmp_path, "6.1.0-57-amd64", "6.12.95+deb12-amd64")
    assert gk.resolve(None, tmp_path / "cache", boot, DEPENDS_61).name == "vmlinuz-6.1.0-57-amd64"
    assert gk.resolve("6.1", tmp_path / "cache", boot, DEPENDS_61).name == "vmlinuz-6.1.0-57-amd64"


def test_without_the_metapackage_the_default_is_the_newest_by_version(tmp_path: Path) -> None:
    boot = make_boot(tmp_path, "6.1.0-9-amd64", "6.1.0-56-amd64", "6.1.0-10-amd64")
    assert gk.default_kernel(boot, depends="").name == "vmlinuz-6.1.0-56-amd64"


@pytest.mark.parametrize("depends, release", [
    (DEPENDS_61, "6.1.0-57-amd64"),
    ("linux-image-6.12.95+deb12-amd64-unsigned (= 6.12.95-1~bpo12+1)", "6.12.95+deb12-amd64"),
    ("linux-image-5.10.0-32-amd64", "5.10.0-32-amd64"),
    ("", None)])
def test_pinned_release(depends: str, release: str | None) -> None:
    assert gk.pinned_release(depends) == release


def test_a_cached_kernel_by_name_or_release_with_its_modules(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    moddir = make_cached(cache, "6.12", "6.12.95+deb12-amd64", usr=True)
    image = gk.resolve("6.12", cache, make_boot(tmp_path, "6.1.0-57-amd64"), DEPENDS_61)
    assert image == cache / "6.12" / "boot" / "vmlinuz-6.12.95+deb12-amd64"
    assert gk.resolve("6.12.95+deb12", cache, tmp_path / "boot", DEPENDS_61).name == image.name
    assert gk.image_modules(image) == cache / "6.12" / "usr/lib/modules/6.12.95+deb12-amd64"
    assert gk.image_modules(image).resolve() == moddir.resolve()
    assert gk.available(cache) == ["6.1", "6.12"]


def test_a_half_unpacked_kernel_is_not_offered(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    moddir = make_cached(cache, "5.10", "5.10.0-32-amd64")
    (moddir / "modules.dep").unlink()  # depmod never ran: the guest could not modprobe
    with pytest.raises(gk.KernelNotFound) as exc:
        gk.resolve("5.10", cache, make_boot(tmp_path, "6.1.0-57-amd64"), DEPENDS_61)
    assert exc.value.wanted == "5.10" and exc.value.known == ["6.1"]
    assert "sh tests/vm/setup.sh --kernels" in str(exc.value)


def test_missing_modules_counts_built_in_ones_as_present(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    present = [m for m in gk.NEEDED_MODULES if m not in ("configfs", "target_core_user")]
    moddir = make_cached(cache, "6.1-rt", "6.1.0-57-rt-amd64", modules=tuple(present))
    assert gk.missing_modules(moddir) == ["target_core_user"]


def test_every_fetchable_kernel_names_its_suites() -> None:
    fetchable = [k.name for k in gk.KERNELS if k.suites]
    assert fetchable == ["5.10", "6.12", "6.1-rt"]
    assert gk.BY_NAME[gk.DEFAULT].suites == ()

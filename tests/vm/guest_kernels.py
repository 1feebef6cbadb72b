"""The guest kernels the rig can boot besides the default one: which, where, and how to fetch them.

    python -m tests.vm.guest_kernels fetch [NAME ...]   (as root; what `sh tests/vm/setup.sh --kernels` runs)
    python -m tests.vm.guest_kernels list

The default guest kernel is Debian 12's 6.1 in /boot (linux-image-amd64).
The others are Debian's own packages, unpacked into a cache directory
(default /var/lib/switch-agent-vm/kernels, env SWITCH_AGENT_VM_KERNEL_CACHE; not under
/var/cache, which virtme-ng's guest init hides under a tmpfs):

    <cache>/<release>/boot/vmlinuz-<release>
    <cache>/<release>/[usr/]lib/modules/<release>/      (depmod run on it)
    <cache>/<name> -> <release>                          (e.g. 5.10 -> 5.10.0-32-amd64)

Nothing is installed: no dpkg database entry, no file in /boot or /lib/modules,
no apt source on the host.  apt runs with a private state directory per suite
(<cache>/apt/<suite>), so the host's own package lists and pinning are not
touched either.  virtme-ng finds the modules next to the image (it walks up
from the image to the directory holding lib/modules) and links them into the
guest's /lib/modules.  A kernel already unpacked is not fetched again.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("SWITCH_AGENT_VM_KERNEL_CACHE", "/var/lib/switch-agent-vm/kernels"))
DEBIAN = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
LISTS_MAX_AGE_S = 86400
# What the rig and the guest tests load (tests/vm/guest_init.py MODULES and the
# guest tests); a kernel without one of them is reported, not silently used.
NEEDED_MODULES = ("dm-switch", "dm-multipath", "dm-round-robin", "dm-queue-length", "target_core_user",
                  "target_core_file", "iscsi_target_mod", "iscsi_tcp", "configfs", "sg", "uio")
DEFAULT = "6.1"


@dataclass(frozen=True)
class GuestKernel:
    name: str
    about: str
    suites: tuple[str, ...]
    """apt suites to look in (empty: the default kernel in /boot)."""
    meta: str = "linux-image-amd64"
    """The metapackage whose dependency names the versioned image package."""


KERNELS = (
    GuestKernel("5.10", "Debian 11 (bullseye)", ("bullseye",)),
    GuestKernel(DEFAULT, "Debian 12 (bookworm), the rig's default, from /boot", ()),
    GuestKernel("6.12", "Debian 12 backports (Debian 13 ships the same 6.12 series)", ("bookworm-backports",)),
    GuestKernel("6.1-rt", "Debian 12 PREEMPT_RT flavour", ("bookworm", "bookworm-security"),
                meta="linux-image-rt-amd64"),
)
BY_NAME = {k.name: k for k in KERNELS}


class KernelNotFound(LookupError):
    """--kernel names nothing the rig can boot."""

    def __init__(self, wanted: str, known: list[str]):
        self.wanted, self.known = wanted, known
        super().__init__(f"no guest kernel {wanted!r}; known: {', '.join(known) or 'none'} "
                         f"(fetch the others with: sh tests/vm/setup.sh --kernels)")


def version_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def pinned_release(depends: str) -> str | None:
    """linux-image-amd64's Depends field -> the release it pins, e.g. '6.1.0-57-amd64'."""
    m = re.search(r"linux-image-(\S+?)(?:-unsigned)?(?:\s|,|\(|$)", depends)
    return m.group(1) if m else None


def installed_meta_depends() -> str:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f", "${Depends}", "linux-image-amd64"],
                              capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def default_kernel(boot: Path = Path("/boot"), depends: str | None = None) -> Path | None:
    """The kernel the rig boots when not told otherwise: the one the installed linux-image-amd64
    depends on (Debian 12's 6.1), so that another kernel landing in /boot does not change it;
    without that package, the newest /boot/vmlinuz-*."""
    release = pinned_release(installed_meta_depends() if depends is None else depends)
    if release and (boot / f"vmlinuz-{release}").is_file():
        return boot / f"vmlinuz-{release}"
    kernels = sorted(boot.glob("vmlinuz-*"), key=lambda p: version_key(p.name))
    return kernels[-1] if kernels else None


def cached_image(root: Path) -> Path | None:
    """<cache>/<release>/boot/vmlinuz-<release>, if the unpacked tree is complete."""
    images = sorted(root.glob("boot/vmlinuz-*"))
    if len(images) != 1:
        return None
    release = images[0].name.removeprefix("vmlinuz-")
    return images[0] if modules_dir(root, release) else None


def modules_dir(root: Path, release: str) -> Path | None:
    """root/lib/modules/<release> or root/usr/lib/modules/<release> (merged /usr), with modules.dep."""
    for d in (root / "lib/modules" / release, root / "usr/lib/modules" / release):
        if (d / "modules.dep").is_file():
            return d
    return None


def resolve(wanted: str | None, cache: Path = CACHE, boot: Path = Path("/boot"),
            depends: str | None = None) -> Path:
    """--kernel: None or '6.1' -> the default; a name from KERNELS, a release or a path -> its image."""
    if wanted in (None, "", DEFAULT, "default"):
        image = default_kernel(boot, depends)
        if image is None:
            raise KernelNotFound(wanted or DEFAULT, [])
        return image
    if "/" in wanted:
        return Path(wanted)
    for candidate in (cache / wanted, cache / f"{wanted}-amd64"):
        image = cached_image(candidate) if candidate.is_dir() else None
        if image:
            return image
    if (boot / f"vmlinuz-{wanted}").is_file():
        return boot / f"vmlinuz-{wanted}"
    raise KernelNotFound(wanted, available(cache))


def available(cache: Path = CACHE) -> list[str]:
    """The names --kernel accepts right now."""
    names = [DEFAULT]
    names += [k.name for k in KERNELS if k.suites and (cache / k.name).is_dir() and cached_image(cache / k.name)]
    return names


def image_modules(image: Path) -> Path | None:
    """The modules directory the guest will use for `image`: next to it (<root>/boot/vmlinuz-R and
    <root>/lib/modules/R, as virtme-ng looks), else the host's /lib/modules/R."""
    release = image.name.removeprefix("vmlinuz-")
    if image.parent.name == "boot" and image.parent.parent != Path("/"):
        return modules_dir(image.parent.parent, release)
    d = Path("/lib/modules", release)
    return d if (d / "kernel").is_dir() else None


def missing_modules(moddir: Path) -> list[str]:
    """Which of NEEDED_MODULES the modules directory lacks (built in counts as present)."""
    names = set()
    for index in ("modules.dep", "modules.builtin"):
        try:
            text = (moddir / index).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            path = line.split(":", 1)[0]
            base = path.rsplit("/", 1)[-1]
            names.add(re.sub(r"\.ko(\.\w+)?$", "", base).replace("-", "_"))
    return [m for m in NEEDED_MODULES if m.replace("-", "_") not in names]


# --- fetching (root, network) ----------------------------------------------------------

def say(msg: str) -> None:
    print(f"kernels: {msg}", flush=True)


class Apt:
    """apt-get / apt-cache over a private state directory for some suites: the host's apt is not touched."""

    def __init__(self, cache: Path, suites: tuple[str, ...]):
        self.dir = cache / "apt" / "+".join(suites)
        (self.dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.dir / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        lines = []
        for suite in suites:
            url = DEBIAN + ("-security" if suite.endswith("-security") else "")
            lines.append(f"deb [signed-by={KEYRING}] {url} {suite} main")
        (self.dir / "sources.list").write_text("\n".join(lines) + "\n")
        (self.dir / "status").touch()
        self.opts = ["-o", f"Dir::Etc::SourceList={self.dir / 'sources.list'}",
                     "-o", "Dir::Etc::SourceParts=/nonexistent",
                     "-o", "Dir::Etc::Preferences=/nonexistent",
                     "-o", "Dir::Etc::PreferencesParts=/nonexistent",
                     "-o", f"Dir::State::Lists={self.dir / 'lists'}",
                     "-o", f"Dir::State::status={self.dir / 'status'}",
                     "-o", f"Dir::Cache::Archives={self.dir / 'archives'}",
                     "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
                     "-o", "APT::Sandbox::User=root"]

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        argv = [tool, "-q", *self.opts, *args]
        p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join([tool, *args])} failed ({p.returncode}): {p.stderr.strip()[-1500:]}")
        return p.stdout

    def update(self) -> None:
        lists = list((self.dir / "lists").glob("*_Packages*"))
        if lists and min(time.time() - p.stat().st_mtime for p in lists) < LISTS_MAX_AGE_S:
            return
        say(f"apt-get update ({self.dir.name})")
        self.run("apt-get", "update")

    def image_package(self, meta: str) -> str:
        """linux-image-amd64 -> linux-image-5.10.0-32-amd64 (its versioned image package)."""
        out = self.run("apt-cache", "depends", meta)
        m = re.search(r"Depends: (linux-image-\S+)", out)
        if not m:
            raise RuntimeError(f"{meta} in {self.dir.name} depends on no image package:\n{out}")
        return m.group(1)


def fetch(kernel: GuestKernel, cache: Path = CACHE) -> Path:
    """Download and unpack one kernel (image and modules) into the cache; idempotent."""
    link = cache / kernel.name
    image = cached_image(link) if link.is_dir() else None
    if image:
        say(f"{kernel.name}: {image} (already unpacked)")
        return image
    apt = Apt(cache, kernel.suites)
    apt.update()
    package = apt.image_package(kernel.meta)
    release = package.removeprefix("linux-image-").removesuffix("-unsigned")
    root = cache / release
    if not (root.is_dir() and cached_image(root)):
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            say(f"{kernel.name}: apt-get download {package}")
            apt.run("apt-get", "download", package, cwd=Path(tmp))
            debs = list(Path(tmp).glob("*.deb"))
            if len(debs) != 1:
                raise RuntimeError(f"apt-get download {package} left {debs}")
            unpacked = Path(tmp) / "root"
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True, timeout=600)
            moddir = next((d for d in (unpacked / "lib/modules" / release, unpacked / "usr/lib/modules" / release)
                           if d.is_dir()), None)
            if moddir is None or not (unpacked / "boot" / f"vmlinuz-{release}").is_file():
                raise RuntimeError(f"{package} holds no boot/vmlinuz-{release} and lib/modules/{release}")
            base = moddir.parents[2]  # <base>/lib/modules/<release>
            # Debian generates modules.dep in the package's postinst, which we do not run.
            subprocess.run(["depmod", "-b", str(base), release], check=True, timeout=600)
            shutil.rmtree(root, ignore_errors=True)
            unpacked.rename(root)
    tmp_link = cache / f".{kernel.name}.link"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(release)
    tmp_link.replace(link)
    image = cached_image(link)
    assert image is not None, f"{link} incomplete after unpacking"
    say(f"{kernel.name}: {image}")
    return image


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vm.guest_kernels", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="download and unpack the extra kernels (root)")
    f.add_argument("names", nargs="*", help=f"default: all of {[k.name for k in KERNELS if k.suites]}")
    sub.add_parser("list", help="what --kernel accepts here, with each image and missing modules")
    args = p.parse_args(argv)
    if args.action == "list":
        for name in available():
            image = resolve(name)
            moddir = image_modules(image)
            lacks = missing_modules(moddir) if moddir else ["(no modules directory)"]
            print(f"{name:8} {image}  {'lacks ' + ', '.join(lacks) if lacks else 'all needed modules'}")
        return 0
    names = args.names or [k.name for k in KERNELS if k.suites]
    unknown = [n for n in names if n not in BY_NAME or not BY_NAME[n].suites]
    if unknown:
        p.error(f"not fetchable: {unknown} (choose from {[k.name for k in KERNELS if k.suites]})")
    CACHE.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in names:
        try:
            image = fetch(BY_NAME[name])
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            say(f"{name}: FAILED: {e}")
            failed += 1
            continue
        lacks = missing_modules(image_modules(image))
        if lacks:
            say(f"{name}: lacks modules {', '.join(lacks)}: the tests that need them skip on it")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

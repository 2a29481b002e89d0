"""Podman for the container tests: build and run the shipped Dockerfile as Docker would.

There is no Docker engine and no reachable container registry on these machines, but as
root Debian's podman builds the Dockerfile unchanged (``--format docker``, else podman
drops HEALTHCHECK) on a local stand-in for ``python:3.11-slim``: a debootstrapped
bookworm (Debian's Python 3.11) with a venv at ``/usr/local``, so ``python`` and ``pip``
sit where the official image has them. The stand-in gets the host's CA bundle so pip
inside the build reaches the package index as the host does; the shipped Dockerfile
never sees any of this. Made once, then cached in podman's store (a rebuild of the
service image takes ~35 s; the first run ~2 min more).

Settings go to a private containers.conf (``CONTAINERS_CONF``), never /etc: podman's
default ulimits ask for more than root may set here (no CAP_SYS_RESOURCE), and crun
refuses this machine's hybrid cgroup layout while runc works.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["BASE_IMAGE", "Podman", "missing_requirements"]

BASE_IMAGE = "docker.io/library/python:3.11-slim"
MINBASE_IMAGE = "localhost/debian:bookworm-minbase"
CACHE = Path(os.environ.get("AUTHZ_TEST_CACHE", Path.home() / ".cache" / "authz-tests"))
TOOLS = ("podman", "runc", "debootstrap")

_STAND_IN = """\
FROM localhost/debian:bookworm-minbase
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY pip.conf /etc/pip.conf
RUN python3 -m venv /usr/local && /usr/local/bin/python -m pip --version
ENV PYTHONDONTWRITEBYTECODE=1
CMD ["python3"]
"""


def missing_requirements() -> str | None:
    """Why the container tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return (
            "the container test could not run: podman builds and runs images only as root "
            "on these machines (CI runs as root); this run is not root"
        )
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        return (
            f"the container test could not run: {', '.join(absent)} not installed "
            "(scripts/test installs them as root through scripts/apt-deps)"
        )
    return None


def debian_mirror() -> str:
    """The Debian mirror apt uses here (debootstrap needs one)."""
    if "AUTHZ_TEST_DEBIAN_MIRROR" in os.environ:
        return os.environ["AUTHZ_TEST_DEBIAN_MIRROR"]
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        m = re.search(r"^URIs:\s*(\S+/debian)\s*$", sources.read_text(), re.MULTILINE)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


class Podman:
    def __init__(self) -> None:
        CACHE.mkdir(parents=True, exist_ok=True)
        self.conf = CACHE / "containers.conf"
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
        self.conf.write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def __call__(
        self, *args: str, timeout: float = 600, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, timeout=timeout,
            input=input.decode() if input is not None else None, text=True, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def image_exists(self, ref: str) -> bool:
        return self("image", "exists", ref, check=False).returncode == 0

    def ensure_base(self) -> None:
        """The python:3.11-slim stand-in, made once and kept in podman's store."""
        if self.image_exists(BASE_IMAGE):
            return
        if not self.image_exists(MINBASE_IMAGE):
            with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                rootfs = Path(tmp) / "rootfs"
                subprocess.run(
                    ["debootstrap", "--variant=minbase",
                     "--include=python3,python3-venv,ca-certificates",
                     "bookworm", str(rootfs), debian_mirror()],
                    check=True, capture_output=True, timeout=900,
                )  # fmt: skip
                tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."],
                                       stdout=subprocess.PIPE)  # fmt: skip
                try:
                    subprocess.run(["podman", "import", "-", MINBASE_IMAGE], stdin=tar.stdout,
                                   env=self.env, check=True, capture_output=True, timeout=600)  # fmt: skip
                finally:
                    assert tar.stdout is not None
                    tar.stdout.close()
                    tar.wait(60)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            ctx = Path(tmp)
            (ctx / "Containerfile").write_text(_STAND_IN)
            shutil.copy("/etc/ssl/certs/ca-certificates.crt", ctx / "ca-certificates.crt")
            (ctx / "pip.conf").write_text(
                "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ndefault-timeout = 180\n"
            )
            self("build", "--pull=never", "-t", BASE_IMAGE, "-f", str(ctx / "Containerfile"),
                 str(ctx), timeout=900)  # fmt: skip

    def build(self, tag: str, context: Path) -> None:
        self.ensure_base()
        self("build", "--pull=never", "--format", "docker", "-t", tag, str(context), timeout=900)
        # Earlier builds' images (untagged now, no children) would pile up run after run;
        # this build's cached layers are parents of the tag and stay.
        self("image", "prune", "-f", check=False)

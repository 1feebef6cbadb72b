"""Builds the dm-switch encoder's compiled core (protocol/_dmswitch_encode.c); everything else is in pyproject.toml.

setup.py rather than pyproject's ext-modules table: Debian 12's setuptools
(66) predates that table, and the Debian package builds with it.
SWITCH_AGENT_ENCODER=python at build time skips the extension, for a
platform without a C compiler; the agent then needs the same variable at
run time to use the pure-Python encoder (docs/packaging.md).
"""

import os

from setuptools import Extension, setup

core = Extension(
    "protocol._dmswitch_encode",
    sources=["protocol/_dmswitch_encode.c"],
    extra_compile_args=["-std=c11", "-O3", "-Wall", "-Wextra"],
)

setup(ext_modules=[] if os.environ.get("SWITCH_AGENT_ENCODER") == "python" else [core])

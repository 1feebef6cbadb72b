"""conftest.py of the package build's test run (debian/rules copies it in).

A package is built on whatever machine builds it; a busy one must not fail
a hypothesis test on its per-example deadline, which measures the machine,
not the code.
"""

from hypothesis import settings

settings.register_profile("debian-build", deadline=None)
settings.load_profile("debian-build")

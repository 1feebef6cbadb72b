"""Host unit tests: hypothesis without its per-example deadline.

The deadline measures the machine, not the code: tests/run.sh builds the
systemd guest's image beside these tests, and a loaded machine once failed a
round-trip test on its first example's 279 ms (0.6 ms on the replay).
What the tests assert about the code is unchanged.
"""

from hypothesis import settings

settings.register_profile("switch-agent-unit", deadline=None)
settings.load_profile("switch-agent-unit")

"""packaging/prometheus: the alert rules are valid (promtool check rules) and fire when they should (promtool test rules).

promtool comes with Debian's `prometheus` package (tests/vm/setup.sh installs it).
Without it these tests skip and say so, except under CI=true, where they fail:
a CI run must not go green without having checked the rules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

RULES_DIR = Path(__file__).resolve().parents[2] / "packaging" / "prometheus"
RULES = RULES_DIR / "switch-agent.rules.yml"
RULE_TESTS = RULES_DIR / "switch-agent.rules.test.yml"
ALERTS = ("SwitchAgentLunNotRouted", "SwitchAgentMemberWithoutActivePath", "SwitchAgentMapStale",
          "SwitchAgentReconcileErrors", "SwitchAgentMetricsNotWritten", "SwitchAgentMemberSessionsShort")


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool not found (Debian package prometheus; sh tests/vm/setup.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_the_rules_pass_promtool_check(promtool):
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_every_alert_fires_on_its_sample_series(promtool):
    result = run(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    tests = RULE_TESTS.read_text()
    for alert in ALERTS:  # each alert is tested, not only loaded
        assert f"alertname: {alert}" in tests, alert


def test_a_rule_that_does_not_fire_fails_the_rule_tests(promtool, tmp_path):
    """The rule tests can fail: the same tests against a rule that never fires do."""
    broken = RULES.read_text().replace("expr: switch_agent_lun_routed == 0", "expr: switch_agent_lun_routed == 2")
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    result = run(promtool, "test", "rules", str(tmp_path / RULE_TESTS.name))
    assert result.returncode != 0 and "SwitchAgentLunNotRouted" in result.stdout + result.stderr

"""`switch-agent login` / `logout` over a fake iscsiadm, and their command lines."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from agent import cli, control
from agent.config import Config, ConfigError
from agent.kernel.iscsi import IscsiAuthError, IscsiConnectError, Iscsiadm
from agent.kernel.sysfs import Portal
from agent.login import LoginResult, LoginUsageError, TargetNotOfferedError, login, parse_portal
from tests.unit.fakes_iscsi import FakeIscsiadm, FakeTarget

VOL = "iqn.2003-01.org.example:vol0"
OTHER = "iqn.2003-01.org.example:vol1"
GROUP = Portal("127.0.0.1", 3260)


def fake(*targets: FakeTarget) -> FakeIscsiadm:
    return FakeIscsiadm(list(targets) or [FakeTarget(VOL, {GROUP: 1, Portal("127.0.0.2", 3260): 2})])


def run_login(iscsi: FakeIscsiadm, config: Config = Config(), **kw) -> LoginResult:
    return asyncio.run(login(config, Iscsiadm(iscsi), GROUP, **kw))


@pytest.mark.parametrize("text, portal", [
    ("10.0.0.10", Portal("10.0.0.10", 3260)),
    ("10.0.0.10:3261", Portal("10.0.0.10", 3261)),
    ("[fd00::1]:3260", Portal("fd00::1", 3260)),
    ("[fd00::1]", Portal("fd00::1", 3260)),
    ("fd00::1", Portal("fd00::1", 3260)),
    ("array.example", Portal("array.example", 3260)),
])
def test_portals_parse(text, portal):
    assert parse_portal(text) == portal


@pytest.mark.parametrize("text", ["", "10.0.0.10:0", "10.0.0.10:x", "[fd00::1", "-p", "a b", "[fd00::1]x",
                                  "10.0.0.10:70000"])
def test_bad_portals_are_usage_errors(text):
    with pytest.raises(LoginUsageError):
        parse_portal(text)


def test_login_makes_the_record_with_the_agents_settings_and_one_session():
    iscsi = fake()
    result = run_login(iscsi)
    assert result == LoginResult(VOL, GROUP, True, True, (VOL,))
    record = iscsi.records[(VOL, GROUP, "default")]
    assert record["node.startup"] == "automatic"
    assert record["node.conn[0].timeo.login_timeout"] == "15"
    # Once made, its settings in one iscsiadm call: each call is most of a second in a TCG guest.
    made = next(i for i, call in enumerate(iscsi.calls) if "new" in call)
    assert sum("update" in call for call in iscsi.calls[made:]) == 1
    assert len(iscsi.sessions) == 1
    # Discovery wrote no records for the other portals it listed.
    assert list(iscsi.records) == [(VOL, GROUP, "default")]
    # Again: nothing more is made.
    again = run_login(iscsi, startup="manual")
    assert not again.record_created and not again.session_logged_in
    assert len(iscsi.sessions) == 1 and iscsi.records[(VOL, GROUP, "default")]["node.startup"] == "manual"


def test_several_targets_need_target_and_an_unknown_one_is_named():
    iscsi = fake(FakeTarget(VOL, {GROUP: 1}), FakeTarget(OTHER, {GROUP: 1}))
    with pytest.raises(LoginUsageError, match=f"{OTHER}.*|.*{VOL}"):
        run_login(iscsi)
    with pytest.raises(TargetNotOfferedError, match="iqn.2003-01.org.example:nope"):
        run_login(iscsi, target="iqn.2003-01.org.example:nope")
    assert run_login(iscsi, target=OTHER).target == OTHER
    assert list(iscsi.records) == [(OTHER, GROUP, "default")]


def test_an_unreachable_portal_fails_with_nothing_made():
    iscsi = fake()
    iscsi.unreachable.add(GROUP)
    with pytest.raises(IscsiConnectError):
        run_login(iscsi)
    assert iscsi.records == {} and iscsi.sessions == {}


def test_wrong_chap_fails_and_leaves_no_record(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the credentials file must be root's")
    creds = tmp_path / "chap.toml"
    creds.write_text('username = "host"\npassword = "wrong-secret"\n')
    creds.chmod(0o600)
    iscsi = fake(FakeTarget(VOL, {GROUP: 1}, chap=("host", "right-secret")))
    config = Config(chap_credentials_file=creds)
    with pytest.raises(IscsiAuthError) as caught:
        run_login(iscsi, config)
    assert "wrong-secret" not in str(caught.value)
    assert iscsi.records == {} and iscsi.sessions == {}
    creds.write_text('username = "host"\npassword = "right-secret"\n')
    assert run_login(iscsi, config).session_logged_in


def test_a_bad_credentials_file_stops_before_anything_is_made(tmp_path):
    creds = tmp_path / "chap.toml"
    creds.write_text('username = "host"\npassword = "x"\n')
    creds.chmod(0o644)
    iscsi = fake()
    with pytest.raises(ConfigError, match="chmod 600|owned"):
        run_login(iscsi, Config(chap_credentials_file=creds))
    assert iscsi.calls == []


# -- the command line ----------------------------------------------------------------


def test_login_cli_usage_errors_exit_2(capsys, tmp_path):
    assert cli.main(["--socket", str(tmp_path / "s"), "login", "--portal", "10.0.0.1:99999"]) == cli.EXIT_USAGE
    assert "port" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["login"])  # --portal is required
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["login", "--portal", "10.0.0.1", "--startup", "onboot"])


def test_login_cli_json_and_the_daemon_message(monkeypatch, capsys, tmp_path):
    seen = []

    async def fake_login(config, iscsiadm, portal, **kw):
        seen.append((portal, kw))
        return LoginResult(VOL, portal, True, True, (VOL,))

    def fake_request(path, message, **kw):
        seen.append(message)
        return {"target": VOL, "luns": []}

    monkeypatch.setattr("agent.login.login", fake_login)
    monkeypatch.setattr(control, "request", fake_request)
    code = cli.main(["--socket", str(tmp_path / "s"), "login", "--portal", "10.0.0.1", "--json"])
    assert code == cli.EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert out == {"target": VOL, "portal": "10.0.0.1:3260", "record_created": True, "session_logged_in": True,
                   "daemon_told": True, "targets": [VOL]}
    assert seen[0] == (Portal("10.0.0.1", 3260), {"target": None, "startup": "automatic"})
    assert seen[1] == {"command": "sessions", "target": VOL, "portal": "10.0.0.1:3260", "iface": "default"}


def test_login_cli_without_a_daemon_still_succeeds(monkeypatch, capsys, tmp_path):
    async def fake_login(config, iscsiadm, portal, **kw):
        return LoginResult(VOL, portal, False, True, (VOL,))

    monkeypatch.setattr("agent.login.login", fake_login)
    assert cli.main(["--socket", str(tmp_path / "none.sock"), "login", "--portal", "10.0.0.1"]) == cli.EXIT_OK
    captured = capsys.readouterr()
    assert "logged in to" in captured.out and "not running" in captured.err


def test_login_cli_reports_iscsiadm_failures_exit_1(monkeypatch, capsys, tmp_path):
    async def fake_login(config, iscsiadm, portal, **kw):
        raise TargetNotOfferedError(portal, "iqn.x:y", [VOL])

    monkeypatch.setattr("agent.login.login", fake_login)
    assert cli.main(["--socket", str(tmp_path / "s"), "login", "--portal", "10.0.0.1"]) == cli.EXIT_ERROR
    assert VOL in capsys.readouterr().err


def test_logout_cli(monkeypatch, capsys, tmp_path):
    def busy(path, message, **kw):
        raise control.ControlError("/dev/mapper/switch-x is in use (pid 7 (fio))", "DeviceBusyError")

    monkeypatch.setattr(control, "request", busy)
    assert cli.main(["--socket", str(tmp_path / "s"), "logout", "switch-x"]) == cli.EXIT_ERROR
    assert "pid 7 (fio)" in capsys.readouterr().err

    def done(path, message, **kw):
        assert message == {"command": "logout", "ref": "switch-x"}
        return {"target": VOL, "routing_removed": ["/dev/mapper/switch-x"], "sessions_logged_out": [1, 2],
                "records_deleted": ["127.0.0.2:3260 default"], "errors": [], "luns": ["3600"]}

    monkeypatch.setattr(control, "request", done)
    assert cli.main(["--socket", str(tmp_path / "s"), "logout", "switch-x", "--json"]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["sessions_logged_out"] == [1, 2]
    assert cli.main(["--socket", str(tmp_path / "s"), "logout", "switch-x"]) == cli.EXIT_OK
    assert "logged out 2 session(s)" in capsys.readouterr().out
    monkeypatch.undo()
    assert cli.main(["--socket", str(tmp_path / "none.sock"), "logout", "x"]) == cli.EXIT_NO_DAEMON

"""agent.kernel.iscsi over a fake iscsiadm that behaves like open-iscsi, and the sysfs session reader."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from agent.kernel.iscsi import (
    DiscoveredPortal,
    IscsiadmError,
    IscsiadmMissingError,
    IscsiadmOutputError,
    IscsiadmTimeoutError,
    IscsiAuthError,
    IscsiConnectError,
    Iscsiadm,
    IscsiErr,
    IscsiInvalidError,
    IscsiLoginError,
    IscsiNotFoundError,
    IscsiSessionExistsError,
    NodeRecords,
    RunResult,
    Secret,
    parse_sendtargets,
    run_subprocess,
)
from agent.kernel.sysfs import Portal, Sysfs, SysfsGarbledError
from tests.unit.fakes_iscsi import FakeIscsiadm, FakeTarget

TARGET = "iqn.2026-11.org.example:vol0"
P0, P1 = Portal("127.0.0.1", 3260), Portal("127.0.0.2", 3260)
PASSWORD = "pa55-w0rd-not-for-logs"


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def sysroot(tmp_path: Path) -> Path:
    return tmp_path / "sys"


@pytest.fixture
def fake(sysroot: Path) -> FakeIscsiadm:
    return FakeIscsiadm([FakeTarget(TARGET, {P0: 1, P1: 2})], sysfs_root=sysroot)


def test_discovery_argv_and_parse(fake: FakeIscsiadm) -> None:
    found = run(Iscsiadm(fake).discovery_sendtargets(P0))
    assert fake.calls == [["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", "127.0.0.1:3260",
                           "-I", "default", "-o", "nonpersistent"]]
    assert found == [DiscoveredPortal(TARGET, P0, 1), DiscoveredPortal(TARGET, P1, 2)]
    assert fake.records == {}  # nonpersistent: no node records behind the caller's back


def test_parse_sendtargets_ipv6_and_garbage() -> None:
    out = "[fd00::1]:3260,2 iqn.2026-11.org.example:vol0\n\n10.0.0.5:3261,7 eui.02004567A425678D\n"
    assert parse_sendtargets(out) == [
        DiscoveredPortal("iqn.2026-11.org.example:vol0", Portal("fd00::1", 3260), 2),
        DiscoveredPortal("eui.02004567A425678D", Portal("10.0.0.5", 3261), 7)]
    for bad in ("127.0.0.1:3260 iqn.x", "127.0.0.1,1 iqn.x", "127.0.0.1:99999,1 iqn.x",
                "127.0.0.1:3260,1 -oops", "iscsiadm: No portals found"):
        with pytest.raises(ValueError):
            parse_sendtargets(bad)


def test_unparsable_discovery_output_is_typed() -> None:
    async def runner(argv):
        return RunResult(0, "something else entirely\n", "")
    with pytest.raises(IscsiadmOutputError) as err:
        run(Iscsiadm(runner).discovery_sendtargets(P0))
    assert err.value.returncode == 0 and "something else" in str(err.value)


def test_node_record_login_logout_delete(fake: FakeIscsiadm, sysroot: Path) -> None:
    adm = Iscsiadm(fake)

    async def scenario():
        await adm.node_new(TARGET, P1)
        await adm.node_set_startup(TARGET, P1, "manual")
        await adm.node_login(TARGET, P1)
        sessions = await Sysfs(sysroot).iscsi_sessions()
        assert [(s.target_name, s.portal, s.tpgt, s.iface_name, s.state) for s in sessions] == [
            (TARGET, P1, 2, "default", "LOGGED_IN")]
        await adm.session_new(sessions[0].sid)
        assert len(await Sysfs(sysroot).iscsi_sessions()) == 2
        await adm.session_logout(sessions[0].sid)
        assert [s.sid for s in await Sysfs(sysroot).iscsi_sessions()] == [2]
        await adm.node_logout(TARGET, P1)
        assert await Sysfs(sysroot).iscsi_sessions() == []
        await adm.node_delete(TARGET, P1)

    run(scenario())
    node = ["iscsiadm", "-m", "node", "-T", TARGET, "-p", "127.0.0.2:3260", "-I", "default"]
    assert fake.calls == [
        node + ["-o", "new"],
        node + ["-o", "update", "-n", "node.startup", "-v", "manual"],
        node + ["--login"],
        ["iscsiadm", "-m", "session", "-r", "1", "-o", "new"],
        ["iscsiadm", "-m", "session", "-r", "1", "--logout"],
        node + ["--logout"],
        node + ["-o", "delete"],
    ]
    assert fake.records == {}


def test_exit_codes_map_to_typed_errors(fake: FakeIscsiadm) -> None:
    adm = Iscsiadm(fake)
    with pytest.raises(IscsiNotFoundError) as err:
        run(adm.node_login(TARGET, P0))  # no record yet
    assert err.value.code is IscsiErr.NO_OBJS_FOUND and err.value.returncode == 21
    assert "No records found" in str(err.value)
    run(adm.node_new(TARGET, P0))
    run(adm.node_login(TARGET, P0))
    with pytest.raises(IscsiSessionExistsError):
        run(adm.node_login(TARGET, P0))
    with pytest.raises(IscsiNotFoundError) as err:
        run(adm.session_logout(99))
    assert err.value.code is IscsiErr.SYSFS_LOOKUP and "sid 99" in err.value.detail
    run(adm.node_new("iqn.2026-11.org.example:nope", P0))
    with pytest.raises(IscsiConnectError) as err:  # what LIO makes of a target it does not have
        run(adm.node_login("iqn.2026-11.org.example:nope", P0))
    assert err.value.code is IscsiErr.TRANS_TIMEOUT and "connection timed out" in str(err.value)
    run(adm.node_new(TARGET, P1))
    run(adm.node_update(TARGET, P1, "node.session.auth.authmethod", "CHAP"))
    with pytest.raises(IscsiLoginError) as err:  # CHAP offered, the target wants none
        run(adm.node_login(TARGET, P1))
    assert err.value.code is IscsiErr.FATAL_LOGIN and not isinstance(err.value, IscsiAuthError)
    with pytest.raises(IscsiInvalidError):
        run(adm.node_update(TARGET, P0, "node.session.no_such_thing", "1"))
    fake.unreachable.add(P1)
    with pytest.raises(IscsiConnectError) as err:
        run(adm.discovery_sendtargets(P1))
    assert err.value.code is IscsiErr.PDU_TIMEOUT
    for err_type in (IscsiNotFoundError, IscsiLoginError, IscsiConnectError):
        assert issubclass(err_type, IscsiadmError)


def test_several_settings_in_one_update_call(fake: FakeIscsiadm, caplog: pytest.LogCaptureFixture) -> None:
    adm = Iscsiadm(fake)
    caplog.set_level(logging.DEBUG)
    run(adm.node_new(TARGET, P0))
    calls = len(fake.calls)
    run(adm.node_update_many(TARGET, P0, [("node.startup", "manual"), ("node.conn[0].timeo.login_timeout", "15"),
                                          ("node.session.auth.password", Secret(PASSWORD))]))
    assert len(fake.calls) == calls + 1
    assert fake.calls[-1][-13:] == ["-o", "update", "-n", "node.startup", "-v", "manual",
                                    "-n", "node.conn[0].timeo.login_timeout", "-v", "15",
                                    "-n", "node.session.auth.password", "-v", PASSWORD][-13:]
    record = fake.records[(TARGET, P0, "default")]
    assert (record["node.startup"], record["node.conn[0].timeo.login_timeout"],
            record["node.session.auth.password"]) == ("manual", "15", PASSWORD)
    assert PASSWORD not in caplog.text and "node.session.auth.password -v ***" in caplog.text
    # One bad name: iscsiadm says 7 and writes none of them.
    with pytest.raises(IscsiInvalidError) as err:
        run(adm.node_update_many(TARGET, P0, [("node.startup", "automatic"), ("node.no_such_thing", "1"),
                                              ("node.session.auth.password", Secret("other-" + PASSWORD))]))
    assert PASSWORD not in str(err.value)
    assert record["node.startup"] == "manual" and record["node.session.auth.password"] == PASSWORD
    with pytest.raises(ValueError):
        run(adm.node_update_many(TARGET, P0, []))
    with pytest.raises(ValueError):
        run(adm.node_update_many(TARGET, P0, [("node.startup", "manual"), ("node.startup; x", "1")]))


def test_node_exists_looks_without_changing_anything(fake: FakeIscsiadm) -> None:
    adm = Iscsiadm(fake)
    assert not run(adm.node_exists(TARGET, P0))
    run(adm.node_new(TARGET, P0))
    assert run(adm.node_exists(TARGET, P0)) and not run(adm.node_exists(TARGET, P0, iface="iface1"))
    assert fake.calls[-1][-2:] == ["-o", "show"] and fake.sessions == {}


def test_node_records_tell_absence_only_where_known_records_are_found(tmp_path: Path) -> None:
    etc, var = tmp_path / "etc", tmp_path / "var"
    (etc / TARGET / "127.0.0.1,3260,1" / "default").mkdir(parents=True)  # iscsiadm 2.1.8: iface is a file
    records = NodeRecords([str(var), str(etc)])
    known = [(P0, "default")]
    assert records.absent(TARGET, P1, "default", known=known) is True
    assert records.absent(TARGET, P0, "default", known=known) is False
    assert records.absent(TARGET, P0, "iface1", known=known) is True
    (etc / TARGET / "127.0.0.2,3260,-1").mkdir()
    (etc / TARGET / "127.0.0.2,3260,-1" / "default").write_text("node.startup = manual\n")
    assert records.absent(TARGET, P1, "default", known=known) is False
    # Where a record known to exist is not found, it cannot tell: iscsiadm is asked.
    assert records.absent(TARGET, P1, "default", known=[(Portal("127.0.0.9", 3260), "default")]) is None
    assert records.absent(TARGET, P1, "default", known=[]) is None
    assert NodeRecords([str(tmp_path / "none")]).absent(TARGET, P1, "default", known=known) is None
    # IPv6, as open-iscsi names its directories.
    (etc / TARGET / "fd00::1,3260,-1" / "default").mkdir(parents=True)
    assert records.absent(TARGET, Portal("fd00:0::1", 3260), "default", known=known) is False


def test_unknown_exit_code_is_the_base_error() -> None:
    async def runner(argv):
        return RunResult(77, "", "odd\n")
    with pytest.raises(IscsiadmError) as err:
        run(Iscsiadm(runner).session_logout(3))
    assert type(err.value) is IscsiadmError and err.value.code is None and "exit 77" in str(err.value)


def test_timeout_kills_the_call(fake: FakeIscsiadm) -> None:
    fake.hang = lambda argv: "--login" in argv  # a login stuck on a dead portal
    adm = Iscsiadm(fake, timeout_s=30.0)
    run(adm.node_new(TARGET, P0))

    async def scenario():
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(IscsiadmTimeoutError) as err:
            await adm.node_login(TARGET, P0, timeout_s=0.05)
        return loop.time() - started, err.value

    elapsed, error = run(scenario())
    assert elapsed < 5.0  # the call's own timeout, not the default 30 s
    assert error.timeout_s == 0.05 and error.returncode is None
    assert fake.cancelled == [fake.calls[-1]]  # the runner was cancelled, not left running
    assert fake.sessions == {}


def test_real_subprocess_runner_timeout_kills_the_process(tmp_path: Path) -> None:
    script = tmp_path / "iscsiadm"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    adm = Iscsiadm(run_subprocess, binary=str(script))

    async def scenario():
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(IscsiadmTimeoutError):
            await adm.session_logout(1, timeout_s=0.2)
        return loop.time() - started

    assert run(scenario()) < 10.0


def test_real_subprocess_runner_captures_output_without_a_shell(tmp_path: Path) -> None:
    script = tmp_path / "iscsiadm"
    script.write_text('#!/bin/sh\nprintf "%s|" "$@"; echo oops >&2; exit 21\n')
    script.chmod(0o755)
    with pytest.raises(IscsiNotFoundError) as err:
        run(Iscsiadm(run_subprocess, binary=str(script)).node_update(
            TARGET, P0, "node.startup", "manual; rm -rf /"))
    assert err.value.detail == "oops"
    result = run(run_subprocess([str(script), "a b", "$HOME", ";"]))
    assert result.stdout == "a b|$HOME|;|"  # each element one argument, nothing expanded


def test_missing_binary_is_typed() -> None:
    with pytest.raises(IscsiadmMissingError):
        run(Iscsiadm(run_subprocess, binary="/nonexistent/iscsiadm").session_logout(1))


def test_chap_secrets_never_in_logs_or_errors(fake: FakeIscsiadm, caplog: pytest.LogCaptureFixture) -> None:
    fake.targets[TARGET].chap = ("host-user", PASSWORD)
    adm = Iscsiadm(fake)
    caplog.set_level(logging.DEBUG)
    run(adm.node_new(TARGET, P0))
    run(adm.node_set_chap(TARGET, P0, username="host-user", password="wrong-" + PASSWORD))
    with pytest.raises(IscsiAuthError) as err:
        run(adm.node_login(TARGET, P0))
    assert err.value.code is IscsiErr.LOGIN_AUTH_FAILED
    run(adm.node_set_chap(TARGET, P0, username="host-user", password=PASSWORD))
    run(adm.node_login(TARGET, P0))
    # the real value reached iscsiadm's argv ...
    assert ["-n", "node.session.auth.password", "-v", PASSWORD] == fake.calls[-2][-4:]
    # ... and nowhere else
    assert "node.session.auth.password -v ***" in caplog.text
    assert PASSWORD not in caplog.text and "host-user" not in caplog.text
    assert PASSWORD not in str(err.value) and PASSWORD not in repr(err.value.argv)

    async def echoes(argv):  # an iscsiadm that quotes the value back in its error
        return RunResult(7, "", f"iscsiadm: bad value {argv[-1]}\n")
    with pytest.raises(IscsiInvalidError) as err:
        run(Iscsiadm(echoes).node_update(TARGET, P0, "node.session.auth.password", Secret(PASSWORD)))
    assert PASSWORD not in str(err.value) and "bad value ***" in str(err.value)
    assert PASSWORD not in repr(Secret(PASSWORD))


def test_argv_values_are_checked() -> None:
    adm = Iscsiadm(FakeIscsiadm([]))
    for call in (lambda: adm.node_login("-oops", P0),
                 lambda: adm.node_login(TARGET, P0, iface="--op=delete"),
                 lambda: adm.node_login(TARGET, Portal("127.0.0.1", 0)),
                 lambda: adm.node_update(TARGET, P0, "node.startup; x", "manual"),
                 lambda: adm.node_update(TARGET, P0, "node.startup", "a\nnode.startup = automatic"),
                 lambda: adm.node_set_startup(TARGET, P0, "sometimes"),
                 lambda: adm.session_logout(-1)):
        with pytest.raises(ValueError):
            run(call())
    assert adm.runner.calls == []


def test_sysfs_sessions_state_iface_host_disks(fake: FakeIscsiadm, sysroot: Path) -> None:
    fake.targets[TARGET].luns = 2
    adm = Iscsiadm(fake)
    run(adm.node_new(TARGET, P0))
    run(adm.node_new(TARGET, P1, iface="iface1"))
    run(adm.node_login(TARGET, P0))
    run(adm.node_login(TARGET, P1, iface="iface1"))
    fake.fail_session(2)
    sysfs = Sysfs(sysroot)
    assert run(sysfs.iscsi_session_names()) == ["session1", "session2"]
    s1, s2 = run(sysfs.iscsi_sessions())
    assert (s1.sid, s1.target_name, s1.tpgt, s1.portal, s1.state, s1.iface_name) == \
        (1, TARGET, 1, P0, "LOGGED_IN", "default")
    assert s1.host == 2 and s1.recovery_tmo_s == 120 and s1.disks == ("sdb", "sdc")
    assert (s2.sid, s2.state, s2.iface_name, s2.host, s2.disks) == (2, "FAILED", "iface1", 3, ("sdd", "sde"))
    assert run(sysfs.iscsi_session_by_id(2)) == s2


def test_sysfs_sessions_none_and_vanishing(fake: FakeIscsiadm, sysroot: Path) -> None:
    sysfs = Sysfs(sysroot)
    assert run(sysfs.iscsi_sessions()) == []  # no class/iscsi_session at all: transport not loaded
    run(Iscsiadm(fake).node_new(TARGET, P0))
    run(Iscsiadm(fake).node_login(TARGET, P0))
    attrs = sysroot / "devices" / "platform" / "host2" / "session1" / "iscsi_session" / "session1"
    (attrs / "targetname").unlink()  # torn down between listing and reading
    assert run(sysfs.iscsi_sessions()) == []
    (attrs / "targetname").write_text(TARGET + "\n")
    (attrs / "recovery_tmo").write_text("soon\n")
    with pytest.raises(SysfsGarbledError, match="recovery_tmo"):
        run(sysfs.iscsi_sessions())
    (attrs / "recovery_tmo").unlink()
    (attrs / "ifacename").unlink()  # a transport without them: None, not an error
    (session,) = run(sysfs.iscsi_sessions())
    assert session.recovery_tmo_s is None and session.iface_name is None
    with pytest.raises(ValueError):
        run(sysfs.iscsi_session_by_id("../session1"))


def test_chap_credentials_file(tmp_path: Path) -> None:
    import os

    from agent.config import ConfigError, load_chap_credentials
    uid = os.geteuid()
    path = tmp_path / "chap.toml"
    path.write_text(f'username = "host-user"\npassword = "{PASSWORD}"\n')
    path.chmod(0o600)
    creds = load_chap_credentials(path, owner_uid=uid)
    assert (creds.username, creds.password, creds.username_in) == ("host-user", PASSWORD, None)
    assert PASSWORD not in repr(creds) and PASSWORD not in str(creds)

    def refused(key: str, match: str, owner: int = uid) -> None:
        with pytest.raises(ConfigError, match=match) as err:
            load_chap_credentials(path, owner_uid=owner)
        assert err.value.key == key and PASSWORD not in str(err.value)

    path.chmod(0o640)
    refused("chap_credentials_file", "chmod 600")
    path.chmod(0o600)
    refused("chap_credentials_file", "owned by uid", owner=uid + 1)
    path.write_text(f'username = "host-user"\npassword = {PASSWORD}\n')  # unquoted: not TOML
    refused("syntax", "not valid")
    path.write_text(f'username = "host-user"\npassword = "{PASSWORD}"\nusername_in = "array"\n')
    refused("username_in", "go together")
    path.write_text('username = "host-user"\npassword = ""\n')
    refused("password", "non-empty")
    path.write_text(f'user = "host-user"\npassword = "{PASSWORD}"\n')
    refused("user", "unknown key")
    link = tmp_path / "link.toml"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match="cannot open"):
        load_chap_credentials(link, owner_uid=uid)
    with pytest.raises(ConfigError, match="cannot open"):
        load_chap_credentials(tmp_path / "missing.toml", owner_uid=uid)

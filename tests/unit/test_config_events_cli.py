"""Configuration, udev event classification, the control socket and the CLI's argument handling."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import fields
from pathlib import Path

import pytest

from agent import cli, control
from agent.config import Config, ConfigError, config_from_mapping, load_config
from agent.events import Trigger, classify

REPO = Path(__file__).resolve().parents[2]


# -- config -------------------------------------------------------------------

def test_example_config_is_exactly_the_defaults():
    assert load_config(REPO / "packaging" / "switch-agent.toml", required=True) == Config()


def test_missing_default_file_means_defaults(tmp_path):
    assert load_config(tmp_path / "absent.toml") == Config()
    with pytest.raises(ConfigError):
        load_config(tmp_path / "absent.toml", required=True)


@pytest.mark.parametrize("data,key", [
    ({"poll_intervall_s": 5}, "poll_intervall_s"),
    ({"poll_interval_s": "5"}, "poll_interval_s"),
    ({"poll_interval_s": 0}, "poll_interval_s"),
    ({"max_parallel_luns": 1.5}, "max_parallel_luns"),
    ({"device_name": "routed"}, "device_name"),
    ({"device_name": "x;{wwid}"}, "device_name"),
    ({"arrays": []}, "arrays"),
    ({"arrays": [{"vendor": "A"}]}, "arrays[0]"),
    ({"leg_features": "1"}, "leg_features"),
    ({"path_selector": "round-robin"}, "path_selector"),
    ({"log_level": "loud"}, "log_level"),
    ({"early_paths": "yes"}, "early_paths"),
    ({"early_paths": 1}, "early_paths"),
])
def test_bad_config_names_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data)
    assert info.value.key == key


DURATIONS = [f.name for f in fields(Config) if f.type == "float"]


def test_the_duration_keys_are_the_ones_checked_below():
    assert set(DURATIONS) == {"poll_interval_s", "debounce_s", "retry_initial_s", "retry_max_s", "scsi_timeout_s",
                              "fetch_timeout_s", "login_retry_initial_s", "login_retry_max_s", "iscsiadm_timeout_s"}


@pytest.mark.parametrize("literal", ["nan", "+nan", "-nan", "inf", "+inf", "-inf", "86401.0", "0.0", "-1.5"])
@pytest.mark.parametrize("key", DURATIONS)
def test_durations_must_be_finite_positive_and_at_most_a_day(tmp_path, key, literal):
    path = tmp_path / "c.toml"
    path.write_text(f"{key} = {literal}\n")  # TOML has nan and inf literals: they must not slip through
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key and "finite" in info.value.problem


def test_a_day_is_the_longest_duration():
    assert config_from_mapping({name: 86400 for name in DURATIONS}).poll_interval_s == 86400.0


@pytest.mark.parametrize("name", ["s-{wwid}{x}", "{wwid}{}", "{wwid}{0}", "{wwid.upper}", "{mpath.real}-{wwid}",
                                  "{wwid}}", "x{wwid}{", "{{wwid}}", "{{x}}-{wwid}"])
def test_device_name_templates_are_formatted_at_load(name):
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"device_name": name})
    assert info.value.key == "device_name"


@pytest.mark.parametrize("name", ["switch-{wwid}", "{mpath}", "sw.{wwid}+{mpath}", "a_b-{mpath}.2"])
def test_device_name_templates_that_work(name):
    assert config_from_mapping({"device_name": name}).device_name == name


def test_bad_toml_syntax_is_a_config_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("poll_interval_s = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "syntax"


def test_dashes_and_ints_accepted():
    c = config_from_mapping({"poll-interval-s": 3, "leg_features": "1 queue_if_no_path"})
    assert c.poll_interval_s == 3.0 and c.leg_features == "1 queue_if_no_path"


# -- events -------------------------------------------------------------------

MPATH = {"DM_UUID": "mpath-36001405aa", "DM_NAME": "36001405aa", "MPATH_DEVICE_READY": "1"}


def test_mpath_map_add_is_a_build_trigger():
    assert classify("add", "block", "disk", "/devices/virtual/block/dm-0", MPATH) == \
        Trigger("mpath-ready", wwid="36001405aa")


def test_a_reload_that_changes_paths_is_a_trigger():
    reload = {**MPATH, "MPATH_UNCHANGED": "1", "DM_UDEV_DISABLE_OTHER_RULES_FLAG": "1"}
    assert classify("change", "block", "disk", "/x", reload) == Trigger("mpath-ready", wwid="36001405aa")


@pytest.mark.parametrize("extra", [{"MPATH_DEVICE_READY": "0"}, {"DM_UDEV_DISABLE_OTHER_RULES_FLAG": "1"},
                                   {"DM_UUID": "LVM-abc"},
                                   {"DM_UUID": "SWAGENT-top-36001405aa"}, {"DM_UUID": "mpath-a b"},
                                   {"DM_UUID": "mpath-"}])
def test_not_ready_or_not_multipath_is_ignored(extra):
    assert classify("change", "block", "disk", "/x", {**MPATH, **extra}) is None


def test_path_events_and_removal():
    assert classify("change", "block", "disk", "/x", {**MPATH, "DM_ACTION": "PATH_FAILED"}).kind == "path-event"
    assert classify("remove", "block", "disk", "/x", MPATH) == Trigger("mpath-gone", wwid="36001405aa")


def test_a_new_scsi_disk_is_a_path_candidate():
    sd = "/sys/devices/platform/host6/session3/target6:0:0/6:0:0:0/block/sda"
    assert classify("add", "block", "disk", sd, {"DEVNAME": "sda"}) == Trigger("path-added", detail="sda")
    assert classify("add", "block", "disk", sd.replace("sda", "sdab"), {}).detail == "sdab"
    assert classify("change", "block", "disk", sd, {}) is None
    assert classify("remove", "block", "disk", sd, {}) is None
    assert classify("add", "block", "partition", sd + "/sda1", {}) is None
    assert classify("add", "block", "disk", "/sys/devices/virtual/block/dm-3", {}) is None  # kernel's dm add
    assert classify("add", "block", "disk", "/sys/devices/virtual/block/nvme0n1", {}) is None


def test_kernel_wwids_in_multipaths_naming():
    from agent.system import multipath_wwid

    assert multipath_wwid("naa.6025341DB82DA163d3bd459a2676ee53\n") == "36025341db82da163d3bd459a2676ee53"
    assert multipath_wwid("eui.0123456789abcdef") == "20123456789abcdef"
    for other in ("t10.LIO-ORG vol0", "naa.", "naa.60z1", "", "6001405abc", "name.iqn.2003-01.x"):
        assert multipath_wwid(other) is None, other


def test_unit_attention_on_scsi_device():
    t = classify("change", "scsi", "scsi_device", "/devices/h/2:0:0:0", {"SDEV_UA": "INQUIRY_DATA_HAS_CHANGED"})
    assert t == Trigger("unit-attention", scsi_sys_path="/devices/h/2:0:0:0", detail="INQUIRY_DATA_HAS_CHANGED")
    assert classify("change", "scsi", "scsi_device", "/x", {}) is None
    assert classify("add", "block", "partition", "/x", MPATH) is None
    leg = {"DM_UUID": "SWAGENT-leg-1-2-36001405aa", "DM_ACTION": "PATH_FAILED", "DM_PATH": "8:16"}
    assert classify("change", "block", "disk", "/x", leg) == Trigger("leg-path-event", wwid="36001405aa", detail="PATH_FAILED")


# -- control socket -----------------------------------------------------------

def with_server(tmp_path, handler, client, *, allowed_uid=None):
    """Serve `handler` on a socket in tmp_path and run the blocking `client(path)` in a thread."""
    path = tmp_path / "run" / "control.sock"

    async def main():
        uid = os.getuid() if allowed_uid is None else allowed_uid
        server = await control.serve(path, handler, allowed_uid=uid)
        async with server:
            return await asyncio.to_thread(client, path)

    return asyncio.run(main())


def test_control_round_trip_and_errors(tmp_path):
    async def handler(request):
        if request["command"] == "boom":
            raise control.ControlError("no such LUN", "LunNotFoundError")
        return {"echo": request}

    def client(path):
        assert control.request(path, {"command": "status"}) == {"echo": {"command": "status"}}
        with pytest.raises(control.ControlError) as info:
            control.request(path, {"command": "boom"})
        assert "no such LUN" in str(info.value)
        return path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777

    assert with_server(tmp_path, handler, client) == (0o600, 0o700)


def test_control_refuses_other_uids(tmp_path):
    async def handler(request):
        raise AssertionError("must not be called")

    def client(path):
        with pytest.raises(control.ControlError) as info:
            control.request(path, {"command": "status"})
        return info.value.kind

    assert with_server(tmp_path, handler, client, allowed_uid=os.getuid() + 1) == "PermissionError"


def test_control_rejects_garbage(tmp_path):
    import socket as so

    async def handler(request):
        return "ok"

    def client(path):
        with so.socket(so.AF_UNIX, so.SOCK_STREAM) as s:
            s.connect(str(path))
            s.sendall(b"[1,2]\n")
            return json.loads(s.makefile().readline())

    answer = with_server(tmp_path, handler, client)
    assert answer["ok"] is False and "command" in answer["error"]


def test_no_daemon_is_its_own_error(tmp_path):
    with pytest.raises(control.DaemonNotRunningError):
        control.request(tmp_path / "none.sock", {"command": "status"})


# -- CLI ----------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [("4096", 4096), ("64M", 64 << 20), ("10G", 10 << 30), ("1TiB", 1 << 40)])
def test_parse_size(text, value):
    assert cli.parse_size(text) == value


@pytest.mark.parametrize("text", ["-1", "1.5G", "10X", "", "0x10"])
def test_parse_size_rejects(text):
    import argparse
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size(text)


def test_cli_without_daemon_exits_3(tmp_path, capsys):
    assert cli.main(["--socket", str(tmp_path / "none.sock"), "status"]) == cli.EXIT_NO_DAEMON
    assert "not running" in capsys.readouterr().err


def test_logout_says_no_daemon_or_why_it_was_refused(tmp_path, capsys, monkeypatch):
    sock = str(tmp_path / "none.sock")
    assert cli.main(["--socket", sock, "logout", "iqn.2026-11.org.example:vol"]) == cli.EXIT_NO_DAEMON
    assert "not running" in capsys.readouterr().err

    def refused(*args, **kwargs):
        raise control.ControlError("/dev/mapper/vol0 is busy")

    monkeypatch.setattr(control, "request", refused)
    assert cli.main(["--socket", sock, "logout", "iqn.2026-11.org.example:vol"]) == cli.EXIT_ERROR
    assert capsys.readouterr().err == "switch-agent: logout refused: /dev/mapper/vol0 is busy\n"


def test_trigger_is_silent_without_daemon_and_refuses_odd_arguments(tmp_path, capsys):
    sock = str(tmp_path / "none.sock")
    assert cli.main(["--socket", sock, "trigger", "mpath-36001405aa"]) == cli.EXIT_OK
    assert cli.main(["--socket", sock, "trigger", "mpath-$(reboot)"]) == cli.EXIT_USAGE
    assert cli.main(["--socket", sock, "trigger", "--scsi-device", "/devices/../../etc"]) == cli.EXIT_USAGE


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "86401"])
def test_the_poll_interval_flag_is_checked_like_the_file(tmp_path, capsys, value):
    empty = tmp_path / "c.toml"
    empty.write_text("")
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a socket nobody can bind: a daemon let through stops there, it never runs
    argv = ["--config", str(empty), "--socket", str(blocked / "control.sock"), "daemon", f"--poll-interval={value}"]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "command line: poll_interval_s: must be a finite number" in capsys.readouterr().err


def test_bad_config_file_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "c.toml"
    bad.write_text("nonsense = 1\n")
    assert cli.main(["--config", str(bad), "status"]) == cli.EXIT_USAGE
    assert "nonsense: unknown key" in capsys.readouterr().err


def test_every_subcommand_has_help():
    parser = cli.build_parser()
    text = parser.format_help()
    for name in ("daemon", "status", "show", "refresh", "locate", "trigger"):
        assert name in text


def test_status_rendering_shows_errors_and_warnings():
    from agent.cli import render
    record = {"wwid": "3600a", "state": "routed", "device": "/dev/mapper/switch-3600a", "generation": 4,
              "pages": 64, "page_size_bytes": 15 << 20, "map_age_s": 1.5, "unallocated_pages": 0,
              "members": [{"name": "m0", "member_id": 1, "pages": 64,
                           "paths": [{"device": "sdb", "state": "active"}]}],
              "last_error": None, "warnings": ["run `multipathd resize map 3600a`"]}
    text = render("status", [record])
    assert "member m0 (id 1): 64 pages, sdb(active)" in text
    assert "warning: run `multipathd resize map 3600a`" in text and "last error" not in text

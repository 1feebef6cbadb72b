"""The daemon's configuration: /etc/switch-agent/switch-agent.toml, with documented defaults.

Every key is optional; packaging/switch-agent.toml lists them all with
their defaults. Unknown keys and wrong types are errors, not warnings: a
typo in a storage daemon's config should stop it at start, loudly.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import string
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from protocol.errors import SwitchAgentError

DEFAULT_CONFIG_PATH = Path("/etc/switch-agent/switch-agent.toml")
DEFAULT_SOCKET_PATH = Path("/run/switch-agent/control.sock")
DEFAULT_METRICS_TEXTFILE = "/var/lib/prometheus/node-exporter/switch-agent.prom"
"""Debian's prometheus-node-exporter reads *.prom in that directory (--collector.textfile.directory)."""

UUID_PREFIX = "SWAGENT-"
"""Every dm device the agent creates carries this uuid prefix; it touches no other."""


class ConfigError(SwitchAgentError):
    """The configuration file or a flag is invalid: names the key and what was wrong."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key}: {problem}")


@dataclass(frozen=True)
class ArrayMatch:
    """Which LUNs are ours: INQUIRY vendor and product, compared after stripping blanks."""

    vendor: str
    product: str
    map_source: str = "page-map"
    """Where the map comes from: "page-map" (docs/protocol.md), "referrals" (SBC-3, docs/referrals.md)
    or "auto" (VPD 0xC0 listed -> page-map, else 0xB3 listed -> referrals)."""


@dataclass(frozen=True)
class Config:
    """All settings of the daemon and the CLI."""

    arrays: tuple[ArrayMatch, ...] = (ArrayMatch("SWAGENT", "PAGEMAP ARRAY", "page-map"),)
    socket_path: Path = DEFAULT_SOCKET_PATH
    device_name: str = "switch-{wwid}"
    """Name of the routed device under /dev/mapper; {wwid} and {mpath} are filled in."""
    poll_interval_s: float = 15.0
    """How often each LUN's map generation is polled (a 64-byte GET PAGE MAP)."""
    debounce_s: float = 0.5
    """Unit attentions arrive once per path: wait this long for the rest before acting."""
    max_parallel_luns: int = 8
    """LUNs set up at the same time; the rest wait their turn."""
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    fetch_restarts: int = 5
    """How often a fetch starts over when the map changes under it before it gives up."""
    scsi_timeout_s: float = 30.0
    fetch_timeout_s: float = 120.0
    """Longest a whole page-map fetch may take before it is abandoned with an error."""
    max_message_bytes: int = 65536
    path_selector: str = "round-robin 0"
    """dm-multipath path selector (with its argument count) inside each member's leg."""
    leg_features: str = "0"
    """dm-multipath feature arguments of each leg, e.g. "1 queue_if_no_path"."""
    log_level: str = "info"
    early_paths: bool = True
    """Give a routed LUN's new path (a member added, sessions back) to its member's leg as soon as the
    kernel announces the disk, seconds before multipathd's map has it; false: multipathd's paths only
    (when multipath.conf blacklists some paths of the array on purpose)."""
    # -- session management (docs/sessions.md) --
    manage_sessions: bool = True
    """Log in to every member a volume spans and keep its sessions; false: use the sessions the host has."""
    sessions_per_member: int = 2
    """Sessions to each member that owns pages of a volume (eql.conf MaxConnectionsPerMember)."""
    sessions_per_idle_member: int = 0
    """Sessions to each member of a volume that owns none of its pages."""
    max_sessions_per_volume: int = 6
    """All sessions of one volume (MaxDevicesPerMpioSession), shared out page owners first."""
    max_sessions_per_host: int = 1024
    """All iSCSI sessions of the host (MaxMpioSession): no login beyond it."""
    ifaces: tuple[str, ...] = ("default",)
    """open-iscsi ifaces (``iscsiadm -m iface``) the sessions are spread over."""
    include_networks: tuple[str, ...] = ()
    """If any: only portals (and iface addresses) in these networks are used."""
    exclude_networks: tuple[str, ...] = ()
    """Portals (and iface addresses) in these networks are never used."""
    manage_existing_sessions: bool = False
    """Also log out sessions the agent did not make (when a member has too many, or left)."""
    login_retry_initial_s: float = 15.0
    login_retry_max_s: float = 300.0
    """After a failed login, the same portal and iface wait retry_initial, doubling up to retry_max."""
    iscsiadm_timeout_s: float = 60.0
    """Longest one iscsiadm command may take (it is killed after)."""
    chap_credentials_file: Path | None = None
    """A root-only (0600, owned by root) TOML file with ``username``/``password`` (and optionally
    ``username_in``/``password_in``) written into the node records the agent logs in with; None
    (``""`` in the file): no CHAP."""
    metrics_textfile: str = DEFAULT_METRICS_TEXTFILE
    """Prometheus metrics rewritten after every reconcile and poll round, for node_exporter's textfile
    collector; only where its directory exists; "" disables."""
    metrics_listen: str = ""
    """HOST:PORT to serve Prometheus metrics at over HTTP (e.g. 127.0.0.1:9776); "" (the default): off."""


_SCALARS = {f.name: f.type for f in fields(Config) if f.name != "arrays"}
_SECONDS = tuple(name for name, kind in _SCALARS.items() if kind in ("float", float))
MAX_SECONDS = 86400.0
"""A day: any longer is a typo (and SG_IO's timeout is a 32-bit count of milliseconds)."""
DEVICE_NAME_FIELDS = ("wwid", "mpath")
MAP_SOURCES = ("page-map", "referrals", "auto")


def load_config(path: Path | None = None, *, required: bool = False) -> Config:
    """Read the TOML file (a missing default file means all defaults)."""
    path = path or DEFAULT_CONFIG_PATH
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise ConfigError(str(path), "file", "does not exist") from None
        return Config()
    except OSError as exc:
        raise ConfigError(str(path), "file", exc.strerror or str(exc)) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "syntax", str(exc)) from exc
    return config_from_mapping(data, source=str(path))


def config_from_mapping(data: dict[str, Any], *, source: str = "config") -> Config:
    """Build a Config from parsed TOML, checking every key and type."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name == "arrays":
            values["arrays"] = _parse_arrays(value, source)
        elif name in _SESSION_SHAPES:
            values[name] = _coerce_session_key(source, key, name, value)
        elif name in _SCALARS:
            values[name] = _coerce(source, key, value, _SCALARS[name])
        else:
            raise ConfigError(source, key, "unknown key")
    config = replace(Config(), **values)
    check_config(config, source)
    return config


def _parse_arrays(value: Any, source: str) -> tuple[ArrayMatch, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(source, "arrays", "must be a non-empty list of {vendor, product[, map_source]} tables")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not {"vendor", "product"} <= set(item) <= {"vendor", "product", "map_source"} \
                or not all(isinstance(v, str) and v.strip() for v in item.values()):
            raise ConfigError(source, f"arrays[{i}]", "must have a non-empty vendor and product string, "
                                                      "and optionally map_source")
        map_source = item.get("map_source", "page-map").strip()
        if map_source not in MAP_SOURCES:
            raise ConfigError(source, f"arrays[{i}].map_source", f"must be one of {', '.join(MAP_SOURCES)}")
        out.append(ArrayMatch(item["vendor"].strip(), item["product"].strip(), map_source))
    return tuple(out)


def _coerce(source: str, key: str, value: Any, kind: Any) -> Any:
    kind = {"float": float, "int": int, "str": str, "Path": Path, "bool": bool}.get(kind, kind) \
        if isinstance(kind, str) else kind
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is Path and isinstance(value, str):
        return Path(value)
    if kind in (int, str, bool) and type(value) is kind:
        return value
    raise ConfigError(source, key, f"must be {getattr(kind, '__name__', kind)}, got {type(value).__name__} {value!r}")


def check_config(config: Config, source: str) -> None:
    """Raise ConfigError for the first value the daemon could not run with (flags are checked here too)."""
    for name in _SECONDS:
        # nan and inf are TOML floats; nan passes any comparison, and asyncio.sleep(nan) never wakes.
        value = getattr(config, name)
        if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
            raise ConfigError(source, name, f"must be a finite number of seconds, > 0 and <= {MAX_SECONDS:.0f}; "
                                            f"got {value!r}")
    if config.max_parallel_luns < 1:
        raise ConfigError(source, "max_parallel_luns", "must be >= 1")
    if config.fetch_restarts < 0:
        raise ConfigError(source, "fetch_restarts", "must be >= 0")
    if not 256 <= config.max_message_bytes <= 1 << 20:
        raise ConfigError(source, "max_message_bytes", "must be 256..1048576")
    _check_template(config.device_name, source)
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(source, "log_level", "must be debug, info, warning or error")
    selector = config.path_selector.split()
    if len(selector) < 2 or not _counted(selector[1:]):
        raise ConfigError(source, "path_selector", 'must be a selector name and its counted arguments, e.g. "round-robin 0"')
    if not _counted(config.leg_features.split()):
        raise ConfigError(source, "leg_features", 'must be a counted dm feature list, e.g. "0" or "1 queue_if_no_path"')
    _check_sessions(config, source)
    textfile = config.metrics_textfile
    if textfile and not (textfile.startswith("/") and textfile.endswith(".prom") and "\0" not in textfile):
        raise ConfigError(source, "metrics_textfile", 'must be "" (off) or an absolute path ending in .prom '
                                                      "(node_exporter's textfile collector reads only those)")
    if config.metrics_listen:
        try:
            split_listen_address(config.metrics_listen)
        except ValueError as exc:
            raise ConfigError(source, "metrics_listen", str(exc)) from None


def split_listen_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets: [::1]:9776) -> (host, port); ValueError says what is wrong."""
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9_.-]+)):([0-9]{1,5})", text)
    if not match or not 1 <= int(match[3]) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT with a port 1-65535 (e.g. 127.0.0.1:9776 or [::1]:9776)")
    return match[1] or match[2], int(match[3])


def _check_template(template: str, source: str) -> None:
    """Format it once now: "{x}", "{0}" or "{wwid.upper}" would otherwise fail (or worse) at the first LUN."""
    try:
        names = {field for _literal, field, _spec, _conv in string.Formatter().parse(template) if field is not None}
        sample = template.format(wwid="36001405abcdef", mpath="mpatha")
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ConfigError(source, "device_name", f"not a valid template: {type(exc).__name__}: {exc}") from None
    if not names <= set(DEVICE_NAME_FIELDS) or not names:
        # "{wwid.upper}" formats fine, to a method's repr; "{{wwid}}" to the same name for every LUN.
        raise ConfigError(source, "device_name", f"fields {sorted(names)}: only {{wwid}} and {{mpath}} "
                                                 "are filled in, and one of them must be")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", sample):
        raise ConfigError(source, "device_name", f"gives {sample!r}: a name must be letters, digits and _.+- only")


def _counted(args: list[str]) -> bool:
    """dm argument lists carry their own count first: "0", "1 queue_if_no_path"."""
    return (bool(args) and args[0].isdigit() and int(args[0]) == len(args) - 1
            and all(re.fullmatch(r"[A-Za-z0-9_-]+", w) for w in args))


# -- session management ----------------------------------------------------------

_SESSION_SHAPES = ("ifaces", "include_networks", "exclude_networks", "chap_credentials_file")
"""Session keys that are not plain scalars: lists of strings, and an optional path."""
IFACE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_CHAP_KEYS = ("username", "password", "username_in", "password_in")


def _coerce_session_key(source: str, key: str, name: str, value: Any) -> Any:
    if name == "chap_credentials_file":
        if value == "":
            return None  # TOML has no null: the packaged file spells "no CHAP" as ""
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(source, key, 'must be an absolute path, or "" for none')
        return Path(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(source, key, f"must be a list of strings, got {type(value).__name__}")
    return tuple(value)


def _check_sessions(config: Config, source: str) -> None:
    if not 1 <= config.sessions_per_member <= 32:
        raise ConfigError(source, "sessions_per_member", "must be 1..32")
    if not 0 <= config.sessions_per_idle_member <= config.sessions_per_member:
        raise ConfigError(source, "sessions_per_idle_member", "must be 0..sessions_per_member")
    for name in ("max_sessions_per_volume", "max_sessions_per_host"):
        if getattr(config, name) < 1:
            raise ConfigError(source, name, "must be >= 1")
    # login_retry_*_s and iscsiadm_timeout_s are floats: check_config holds them to (0, MAX_SECONDS]
    if config.login_retry_max_s < config.login_retry_initial_s:
        raise ConfigError(source, "login_retry_max_s", "must be >= login_retry_initial_s")
    if not config.ifaces:
        raise ConfigError(source, "ifaces", 'must name at least one open-iscsi iface (e.g. "default")')
    for iface in config.ifaces:
        if not IFACE_NAME.match(iface):
            raise ConfigError(source, "ifaces", f"{iface!r} is not an open-iscsi iface name")
    if len(set(config.ifaces)) != len(config.ifaces):
        raise ConfigError(source, "ifaces", "names an iface twice")
    for name in ("include_networks", "exclude_networks"):
        for network in getattr(config, name):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(source, name, f"{network!r} is not an IPv4/IPv6 network "
                                                '(e.g. "10.1.0.0/16" or "fd00::/64")') from None


@dataclass(frozen=True)
class ChapCredentials:
    """CHAP credentials for the node records; the secrets never show in repr or str."""

    username: str = field(repr=False)
    password: str = field(repr=False)
    username_in: str | None = field(default=None, repr=False)
    password_in: str | None = field(default=None, repr=False)
    """Mutual CHAP: the target's name and secret (both or neither)."""

    def __str__(self) -> str:
        return "CHAP credentials" + (" (mutual)" if self.username_in is not None else "")


def load_chap_credentials(path: Path, *, owner_uid: int = 0) -> ChapCredentials:
    """Read ``chap_credentials_file``: a regular file (no symlink) owned by ``owner_uid`` (root)
    that nobody else may read or write (mode 0600 or stricter), holding TOML ``username = ...``,
    ``password = ...`` and optionally ``username_in``/``password_in``. No error names a value."""
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(source, "chap_credentials_file", f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(source, "chap_credentials_file", "is not a regular file")
        if st.st_uid != owner_uid:
            raise ConfigError(source, "chap_credentials_file", f"must be owned by uid {owner_uid}, not {st.st_uid}")
        if st.st_mode & 0o077:
            raise ConfigError(source, "chap_credentials_file",
                              f"mode {stat.S_IMODE(st.st_mode):04o} lets others read or write it: chmod 600")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            raw = f.read()
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        # the decoder's message can quote the text: say only that it does not parse
        raise ConfigError(source, "syntax", "not valid UTF-8 TOML") from None
    unknown = sorted(set(data) - set(_CHAP_KEYS))
    if unknown:
        raise ConfigError(source, unknown[0], f"unknown key (allowed: {', '.join(_CHAP_KEYS)})")
    for key in _CHAP_KEYS:
        value = data.get(key)
        if value is None and key in ("username_in", "password_in"):
            continue
        if not isinstance(value, str) or not value or any(c in value for c in "\n\r\0"):
            raise ConfigError(source, key, "must be a non-empty one-line string")
    if ("username_in" in data) != ("password_in" in data):
        raise ConfigError(source, "username_in", "username_in and password_in go together")
    return ChapCredentials(data["username"], data["password"], data.get("username_in"), data.get("password_in"))

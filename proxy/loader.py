"""YAML -> the frozen, validated Config of proxy/config.py.

Every error is collected (not just the first) and carries its YAML path and
line: ``services[0].split.weights.canary: line 14: must not be negative``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from proxy.config import (
    ACCESS_LOG_FORMATS,
    HEADERS_WITH_UNDERSCORES,
    LOAD_BALANCING,
    RESERVED_ACTORS,
    TOKEN_ROLES,
    AccessLog,
    Address,
    Config,
    ConfigError,
    Control,
    FieldMatch,
    HashSource,
    HealthCheck,
    IPNetwork,
    Limits,
    ListenerTls,
    Mirror,
    OutlierDetection,
    RerouteTunnels,
    Retries,
    Rule,
    Service,
    ServiceMatch,
    Split,
    StickyCookie,
    Timeouts,
    Token,
    UpstreamTls,
    Version,
    all_weights,
    split_problem,
    unknown_version,
    weight_problem,
)
from proxy.release import InvalidRelease, ReleaseSpec, parse_release
from proxy.tls import TlsProblem, client_context, digest, read_file, server_context

# A config file larger than this is refused before it is read: the YAML loader is pure Python
# (seconds per megabyte), and a runaway file must not take the proxy's memory with it.
MAX_CONFIG_BYTES = 8 * 1024 * 1024

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_TEXT_TAGS = frozenset({_STR, _INT, _FLOAT, _BOOL, _TIMESTAMP})
_KINDS = {
    _STR: "a string",
    _INT: "an integer",
    _FLOAT: "a number",
    _BOOL: "a boolean",
    _NULL: "null",
    _TIMESTAMP: "a date",
}
# Only its stateless scalar converters are used (they read node.value, nothing else).
_SCALARS = yaml.constructor.SafeConstructor()

_SERVICE_NAME = re.compile(r"[a-z0-9-]+")
_VERSION_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TOKEN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: header names, methods
_BEARER = re.compile(r"[\x21-\x7e]+")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_PORT = re.compile(r"[0-9]{1,5}")
_PATH_PREFIX = re.compile(r"/[^\s?#]*")
_REQUEST_PATH = re.compile(r"/[\x21\x22\x24-\x7e]*")  # printable ASCII, no space or '#'
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_BARE_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_TOP_KEYS = (
    "listen",
    "workers",
    "control",
    "timeouts",
    "limits",
    "drain_timeout",
    "headers_with_underscores",
    "tls",
    "state_file",
    "access_log",
    "services",
)
_CONTROL_KEYS = ("listen", "token_env", "token_file", "tokens", "tls")
_LISTENER_TLS_KEYS = ("cert", "key")
_UPSTREAM_TLS_KEYS = ("ca", "server_name", "cert", "key", "verify")
_TOKEN_KEYS = ("name", "token_env", "token_file", "role")
_ACCESS_LOG_KEYS = ("path", "format")
_TIMEOUT_KEYS = ("connect", "response", "idle")
_LIMIT_KEYS = ("max_header_bytes", "header_read_timeout", "max_body_bytes", "max_connections")
_SERVICE_KEYS = (
    "name",
    "match",
    "baseline",
    "fallback",
    "version_header",
    "timeouts",
    "versions",
    "split",
    "rules",
    "load_balancing",
    "max_connections_per_endpoint",
    "health_check",
    "outlier_detection",
    "retries",
    "release",
    "mirror",
    "reroute_tunnels",
    "decision_header",
)
_MIRROR_KEYS = ("to", "percent", "max_body_bytes", "max_in_flight")
_REROUTE_KEYS = ("within",)
_HEALTH_CHECK_KEYS = (
    "path",
    "host",
    "interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
)
_OUTLIER_KEYS = (
    "consecutive_5xx",
    "consecutive_connect_failures",
    "base_ejection_time",
    "max_ejection_time",
    "max_ejection_percent",
)
_RETRY_KEYS = ("attempts",)
_MATCH_KEYS = ("host", "path_prefix")
_VERSION_KEYS = ("endpoints", "tls")
_SPLIT_KEYS = ("weights", "hash_on", "sticky_cookie", "salt")
_STICKY_KEYS = ("name", "max_age")
_HASH_KINDS = ("header", "cookie", "query", "client_ip")
_RULE_KEYS = ("name", "match", "version")
_CONDITION_KEYS = ("header", "cookie", "query", "path_prefix", "method", "source")
_FIELD_KEYS = ("name", "value", "regex", "present")
_FIELD_TESTS = ("value", "regex", "present")

_DEFAULTS = Config(services=())
_T = TypeVar("_T")


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate a YAML document (a relative ``token_file`` is read from the working directory)."""
    return _parse(text, source, base_dir="")


def load_config(path: str) -> Config:
    """Read and validate a config file (a relative ``token_file`` is read from its directory).

    A file over MAX_CONFIG_BYTES is refused before it is read.
    """
    return _parse(_read_config_file(path), path, base_dir=os.path.dirname(path))


def _read_config_file(path: str) -> str:
    """The file's text: its size is checked on the open file (fstat: the file that is read,
    even if the path is swapped meanwhile), and at most one byte over the limit is ever read,
    so a file that grows after the check, or has no size (a pipe), is refused too."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_CONFIG_BYTES:
                raise ConfigError([_too_large(path, f"{size} bytes")])
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror or err}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([_too_large(path, f"more than {MAX_CONFIG_BYTES} bytes read")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: cannot read: not UTF-8 text"]) from None


def _too_large(path: str, size: str) -> str:
    limit = f"{MAX_CONFIG_BYTES} bytes ({MAX_CONFIG_BYTES / 2**20:g} MiB)"
    return f"{path}: too large: {size}; the limit is {limit}"


def parse_duration(text: str) -> float:
    """``250ms``, ``5s``, ``1.5m``, ``1h30m``, ``7d`` or a bare number of seconds -> seconds."""
    if _DURATION.fullmatch(text):
        parts = _DURATION_PART.findall(text)
        seconds = sum(float(amount) * _SECONDS_PER_UNIT[unit] for amount, unit in parts)
    elif _BARE_SECONDS.fullmatch(text):
        seconds = float(text)
    else:
        seconds = math.nan
    if math.isfinite(seconds):
        return seconds
    raise ValueError(
        f"invalid duration {text!r}: expected e.g. 250ms, 5s, 2m, 1h, 7d or a number of seconds"
    )


def parse_address(text: str, *, allow_ephemeral: bool = False) -> Address:
    """``host:port`` or ``[v6]:port``; port 0 (any free port) only with ``allow_ephemeral``."""
    if "://" in text:
        raise ValueError(f"{text!r}: expected host:port without a scheme")
    if "/" in text:
        raise ValueError(f"{text!r}: expected host:port without a path")
    host, port = _split_host_port(text)
    if not _PORT.fullmatch(port):
        raise ValueError(f"{text!r}: the port must be a number")
    lowest = 0 if allow_ephemeral else 1
    if not lowest <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be between {lowest} and 65535")
    return Address(host, int(port))


def parse_match_host(text: str) -> str:
    """``*``, an exact host or ``*.example.com`` -> the lower-case form routing compares."""
    host = text.lower()
    if host.startswith("[") and host.endswith("]") and _is_ipv6(host[1:-1]):
        return host
    if host.startswith("[") or host.count(":") == 1:
        raise ValueError(f"{text!r}: must not contain a port (a service matches any port)")
    if host != "*" and not _is_host(host.removeprefix("*.")):
        raise ValueError(f'{text!r}: expected "*", a host name, or "*.example.com"')
    return host


def _split_host_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        host, separator, port = text[1:].partition("]:")
        if not separator:
            raise ValueError(f'{text!r}: expected "[IPv6]:port"')
        if not _is_ipv6(host):
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address")
        return host, port
    host, separator, port = text.rpartition(":")
    if not separator:
        raise ValueError(f"{text!r}: expected host:port")
    if ":" in host:
        raise ValueError(f'{text!r}: IPv6 addresses go in brackets, e.g. "[::1]:8080"')
    if not host:
        raise ValueError(f"{text!r}: the host is missing (0.0.0.0 listens on every interface)")
    if not _is_host(host):
        raise ValueError(f"{text!r}: {host!r} is not a valid host name or IP address")
    return host, port


def _is_host(host: str) -> bool:
    """A host name or an IPv4 literal (all-digit names must be a valid IPv4 address)."""
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return _HOSTNAME.fullmatch(host) is not None


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def _server_name(text: str) -> str:
    """A version's tls.server_name: a host name (or an IP address) to send as SNI and verify."""
    if not (_is_host(text) or _is_ipv6(text)):
        raise ValueError(f"{text!r} is not a valid host name")
    return text


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP network (CIDR, e.g. 10.0.0.0/8)") from None


def _default_weights(names: list[str]) -> dict[str, float]:
    """No weights configured: everything goes to the first version."""
    return {name: 100.0 if index == 0 else 0.0 for index, name in enumerate(names)}


def _parse(text: str, source: str, base_dir: str) -> Config:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError([_syntax_error(source, text, err)]) from None
    if root is None:
        raise ConfigError([f"{source}: line 1: the configuration is empty"])
    reader = _Reader(source, base_dir)
    config = reader.config(root)
    if reader.errors or config is None:
        raise ConfigError([message for _, message in sorted(reader.errors, key=lambda e: e[0])])
    return config


def node_digest(node: Node) -> str:
    """A digest of what a YAML node says: tags and values, not comments, quoting, flow or
    block style, or the order of mapping keys. A node reached again through an alias is
    digested once (an alias bomb costs its size in nodes, not its expansion)."""
    seen: dict[int, bytes] = {}

    def digest(node: Node) -> bytes:
        known = seen.get(id(node))
        if known is not None:
            return known
        hasher = hashlib.sha256(node.tag.encode("utf-8", "surrogatepass"))
        if isinstance(node, ScalarNode):
            hasher.update(b"s" + str(node.value).encode("utf-8", "surrogatepass"))
        elif isinstance(node, SequenceNode):
            hasher.update(b"q")
            for item in node.value:
                hasher.update(digest(item))
        elif isinstance(node, MappingNode):
            hasher.update(b"m")
            for pair in sorted(digest(key) + digest(value) for key, value in node.value):
                hasher.update(pair)
        seen[id(node)] = result = hasher.digest()
        return result

    return digest(node).hex()


def _syntax_error(source: str, text: str, err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        message = err.problem
        if err.context and err.context_mark is not None:
            message = f"{err.context} at line {err.context_mark.line + 1}, {message}"
        return f"{source}: line {err.problem_mark.line + 1}: invalid YAML: {message}"
    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        return f"{source}: line {line}: invalid YAML: {err.reason}"
    return f"{source}: invalid YAML: {err}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return _KINDS.get(node.tag, f"a value tagged {node.tag}")


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _nearest_line(lines: dict[str, int], path: str) -> int:
    """The line of ``path`` (``steps[1].weight``), or of the nearest path above it."""
    while path not in lines and path:
        cut = max(path.rfind("."), path.rfind("["))
        path = path[: max(cut, 0)]
    return lines.get(path, 0)


def _or(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def _value_of(node: Node, key: str) -> Node | None:
    """The value of ``key`` in a mapping node (None if absent, null, or not a mapping)."""
    if isinstance(node, MappingNode):
        for key_node, value in node.value:
            if isinstance(key_node, ScalarNode) and key_node.value == key and value.tag != _NULL:
                found: Node = value
                return found
    return None


class _Reader:
    """Walks the YAML node tree section by section, collecting every error.

    Readers return None for an absent or invalid value (an invalid one is recorded),
    so the caller falls back to a default and goes on looking for further errors.
    """

    def __init__(self, source: str, base_dir: str) -> None:
        self.source = source
        self.base_dir = base_dir
        self.errors: list[tuple[int, str]] = []  # (line, message): reported in line order

    def error(self, path: str, node: Node, message: str) -> None:
        line = _line(node)
        self.errors.append((line, f"{path}: line {line}: {message}"))

    # ----------------------------------------------------------------- structure

    def entries(self, node: Node, path: str) -> dict[str, tuple[Node, Node]] | None:
        """A mapping's (key node, value node) by key text; None if it is not a mapping."""
        if not isinstance(node, MappingNode):
            self.error(path, node, f"expected a mapping, got {_kind(node)}")
            return None
        entries: dict[str, tuple[Node, Node]] = {}
        for key, value in node.value:
            if key.tag == _MERGE:
                self.error(path, key, "merge keys (<<) are not supported; alias the whole value")
            elif not isinstance(key, ScalarNode) or key.tag not in _TEXT_TAGS:
                self.error(path, key, f"keys must be strings, got {_kind(key)}")
            elif key.value in entries:
                first = _line(entries[key.value][0])
                self.error(_join(path, key.value), key, f"duplicate key (first at line {first})")
            else:
                entries[key.value] = (key, value)
        return entries

    def fields(
        self, node: Node | None, path: str, allowed: tuple[str, ...]
    ) -> dict[str, Node] | None:
        """A fixed-key section's value nodes: {} when absent, None when not a mapping.

        Unknown keys are errors; a key set to null counts as absent.
        """
        if node is None:
            return {}
        entries = self.entries(node, path)
        if entries is None:
            return None
        values: dict[str, Node] = {}
        for name, (key, value) in entries.items():
            if name not in allowed:
                expected = ", ".join(allowed)
                self.error(_join(path, name), key, f"unknown key {name!r} (expected: {expected})")
            elif value.tag != _NULL:
                values[name] = value
        return values

    def required(self, fields: dict[str, Node], key: str, path: str, parent: Node) -> Node | None:
        if key not in fields:
            self.error(_join(path, key), parent, "required")
        return fields.get(key)

    def items(self, node: Node, path: str) -> list[tuple[Node, str]] | None:
        if not isinstance(node, SequenceNode):
            self.error(path, node, f"expected a list, got {_kind(node)}")
            return None
        return [(item, f"{path}[{index}]") for index, item in enumerate(node.value)]

    def one_or_many(self, node: Node | None, path: str) -> list[tuple[Node, str]]:
        """Nothing, a single value or a list of them."""
        if node is None:
            return []
        if not isinstance(node, SequenceNode):
            return [(node, path)]
        return [(item, f"{path}[{index}]") for index, item in enumerate(node.value)]

    # ----------------------------------------------------------------- scalars

    def text(self, node: Node | None, path: str) -> str | None:
        """Any scalar, exactly as written (so ``value: 010`` compares with "010")."""
        if node is None:
            return None
        if isinstance(node, ScalarNode) and node.tag in _TEXT_TAGS:
            return str(node.value)
        self.error(path, node, f"expected a string, got {_kind(node)}")
        return None

    def boolean(self, node: Node | None, path: str) -> bool | None:
        if node is None:
            return None
        if isinstance(node, ScalarNode) and node.tag == _BOOL:
            return _SCALARS.construct_yaml_bool(node)
        self.error(path, node, f"expected true or false, got {_kind(node)}")
        return None

    def true(self, node: Node | None, path: str) -> bool:
        """A flag that can only be switched on (``present: true``, ``client_ip: true``)."""
        value = self.boolean(node, path)
        if value is False and node is not None:
            self.error(path, node, "must be true")
        return bool(value)

    def integer(self, node: Node | None, path: str, minimum: int) -> int | None:
        if node is None:
            return None
        if not (isinstance(node, ScalarNode) and node.tag == _INT):
            self.error(path, node, f"expected an integer, got {_kind(node)}")
            return None
        value = self.int_value(node, path)
        if value is None:
            return None
        if value < minimum:
            self.error(path, node, f"must be at least {minimum}")
            return None
        return value

    def number(self, node: Node, path: str) -> float | None:
        """An int or float; finite and not negative."""
        if isinstance(node, ScalarNode) and node.tag == _INT:
            integer = self.int_value(node, path)
            if integer is None:
                return None
            try:
                value = float(integer)
            except OverflowError:  # past 1.8e308: refused like .inf, not a traceback
                value = math.inf if integer > 0 else -math.inf
        elif isinstance(node, ScalarNode) and node.tag == _FLOAT:
            value = _SCALARS.construct_yaml_float(node)
        else:
            self.error(path, node, f"expected a number, got {_kind(node)}")
            return None
        if not math.isfinite(value):
            self.error(path, node, "must be a finite number")
            return None
        if value < 0:
            self.error(path, node, "must not be negative")
            return None
        return value

    def int_value(self, node: ScalarNode, path: str) -> int | None:
        """An integer scalar's value; over 4300 digits (Python's conversion limit) is refused."""
        try:
            value: int = _SCALARS.construct_yaml_int(node)
        except ValueError:
            self.error(path, node, "too many digits")
            return None
        return value

    def weight(self, node: Node, path: str) -> float | None:
        weight = self.number(node, path)
        problem = weight_problem(weight) if weight is not None else None
        if problem:
            self.error(path, node, problem)
            return None
        return weight

    def duration(self, node: Node | None, path: str, *, positive: bool = True) -> float | None:
        if node is None:
            return None
        if isinstance(node, ScalarNode) and node.tag in (_INT, _FLOAT):
            seconds = self.number(node, path)
        elif isinstance(node, ScalarNode) and node.tag == _STR:
            seconds = self.parsed(node, path, parse_duration)
        else:
            self.error(path, node, f'expected a duration such as "5s", got {_kind(node)}')
            return None
        if positive and seconds == 0:
            self.error(path, node, "must be greater than zero")
            return None
        return seconds

    def address(self, node: Node | None, path: str, *, ephemeral: bool = False) -> Address | None:
        if isinstance(node, SequenceNode):
            self.error(
                path, node, 'expected "host:port", got a list (quote IPv6 addresses: "[::1]:8080")'
            )
            return None
        return self.parsed(node, path, partial(parse_address, allow_ephemeral=ephemeral))

    def parsed(self, node: Node | None, path: str, parse: Callable[[str], _T]) -> _T | None:
        """The text of ``node`` through ``parse``; its ValueError becomes the error message."""
        text = self.text(node, path)
        if text is None or node is None:
            return None
        try:
            return parse(text)
        except ValueError as err:
            self.error(path, node, str(err))
            return None

    def pattern(
        self, node: Node | None, path: str, regex: re.Pattern[str], what: str
    ) -> str | None:
        text = self.text(node, path)
        if text is not None and node is not None and not regex.fullmatch(text):
            self.error(path, node, f"{text!r}: {what}")
            return None
        return text

    def path_prefix(self, node: Node | None, path: str) -> str | None:
        what = "must start with '/' and contain no spaces, '?' or '#'"
        return self.pattern(node, path, _PATH_PREFIX, what)

    def version_ref(self, node: Node | None, path: str, names: list[str] | None) -> str | None:
        """A version name; checked only when the versions themselves could be read."""
        name = self.text(node, path)
        if name is not None and node is not None and names is not None and name not in names:
            self.error(path, node, unknown_version(name, names))
            return None
        return name

    def field_name(self, node: Node | None, path: str, kind: str) -> str | None:
        """A header (lower-cased), cookie or query parameter name."""
        name = self.text(node, path)
        if name is None or node is None:
            return None
        if not name:
            self.error(path, node, "must not be empty")
            return None
        if kind in ("header", "cookie") and not _TOKEN.fullmatch(name):
            self.error(path, node, f"{name!r} is not a valid {kind} name")
            return None
        return name.lower() if kind == "header" else name

    # ----------------------------------------------------------------- top level

    def config(self, root: Node) -> Config | None:
        if not isinstance(root, MappingNode):
            self.error(self.source, root, f"expected a mapping at the top, got {_kind(root)}")
            return None
        fields = self.fields(root, "", _TOP_KEYS) or {}
        timeouts = self.timeouts(fields.get("timeouts"), "timeouts", _DEFAULTS.timeouts)
        listen = self.address(fields.get("listen"), "listen", ephemeral=True)
        drain_timeout = self.duration(fields.get("drain_timeout"), "drain_timeout", positive=False)
        return Config(
            services=self.services(self.required(fields, "services", "", root), timeouts),
            listen=_or(listen, _DEFAULTS.listen),
            workers=_or(self.integer(fields.get("workers"), "workers", 1), _DEFAULTS.workers),
            control=self.control(fields.get("control"), _or(listen, _DEFAULTS.listen)),
            timeouts=timeouts,
            limits=self.limits(fields.get("limits"), "limits"),
            drain_timeout=_or(drain_timeout, _DEFAULTS.drain_timeout),
            headers_with_underscores=_or(
                self.choice(
                    fields.get("headers_with_underscores"),
                    "headers_with_underscores",
                    HEADERS_WITH_UNDERSCORES,
                ),
                _DEFAULTS.headers_with_underscores,
            ),
            tls=self.listener_tls(fields.get("tls"), "tls"),
            state_file=self.state_file(fields.get("state_file")),
            access_log=self.access_log(fields.get("access_log"), "access_log"),
            source=self.source,
        )

    def state_file(self, node: Node | None) -> str | None:
        """The state file's absolute path (a relative one is next to the config file); its
        directory must exist: the file itself is written at the first change."""
        name = self.text(node, "state_file")
        if name is None or node is None:
            return None
        if not name:
            self.error("state_file", node, "must not be empty")
            return None
        path = os.path.abspath(os.path.join(self.base_dir, os.path.expanduser(name)))
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            self.error("state_file", node, f"the directory {directory} does not exist")
        elif os.path.isdir(path):
            self.error("state_file", node, f"{path} is a directory")
        elif not os.access(directory, os.W_OK | os.X_OK):
            self.error("state_file", node, f"the directory {directory} is not writable")
        else:
            return path
        return None

    def timeouts(self, node: Node | None, path: str, base: Timeouts) -> Timeouts:
        """Timeouts read over ``base``: keys left out keep the base value."""
        fields = self.fields(node, path, _TIMEOUT_KEYS) or {}
        connect = self.duration(fields.get("connect"), f"{path}.connect")
        response = self.duration(fields.get("response"), f"{path}.response")
        idle = self.duration(fields.get("idle"), f"{path}.idle")
        return Timeouts(
            connect=_or(connect, base.connect),
            response=_or(response, base.response),
            idle=_or(idle, base.idle),
        )

    def limits(self, node: Node | None, path: str) -> Limits:
        fields = self.fields(node, path, _LIMIT_KEYS) or {}
        default = _DEFAULTS.limits
        header_bytes = self.integer(fields.get("max_header_bytes"), f"{path}.max_header_bytes", 1)
        read_timeout = self.duration(
            fields.get("header_read_timeout"), f"{path}.header_read_timeout"
        )
        body_bytes = self.integer(fields.get("max_body_bytes"), f"{path}.max_body_bytes", 0)
        connections = self.integer(fields.get("max_connections"), f"{path}.max_connections", 0)
        return Limits(
            max_header_bytes=_or(header_bytes, default.max_header_bytes),
            header_read_timeout=_or(read_timeout, default.header_read_timeout),
            max_body_bytes=_or(body_bytes, default.max_body_bytes),
            max_connections=_or(connections, default.max_connections),
        )

    # ----------------------------------------------------------------- access log

    def access_log(self, node: Node | None, path: str) -> AccessLog | None:
        fields = self.fields(node, path, _ACCESS_LOG_KEYS)
        if node is None or fields is None:
            return None
        path_node = self.required(fields, "path", path, node)
        log_path = self.text(path_node, f"{path}.path")
        log_format = self.choice(fields.get("format"), f"{path}.format", ACCESS_LOG_FORMATS)
        if log_path is None or path_node is None:
            return None
        if log_path != "-":
            log_path = self.log_file(log_path, path_node, f"{path}.path")
        if log_path is None:
            return None
        return AccessLog(log_path, _or(log_format, "json"))

    def log_file(self, name: str, node: Node, path: str) -> str | None:
        """A log file's absolute path (a relative one is taken from the config file's
        directory), if the proxy can append to it: its directory must exist already."""
        if not name:
            self.error(path, node, 'must not be empty ("-" is stdout)')
            return None
        file = os.path.abspath(os.path.join(self.base_dir, os.path.expanduser(name)))
        directory = os.path.dirname(file)
        problem = None
        if not os.path.isdir(directory):
            problem = f"directory {directory} does not exist"
        elif os.path.isdir(file):
            problem = f"{file} is a directory"
        elif os.path.exists(file) and not os.access(file, os.W_OK):
            problem = f"cannot write to {file}"
        elif not os.path.exists(file) and not os.access(directory, os.W_OK | os.X_OK):
            problem = f"cannot create a file in {directory}"
        if problem is not None:
            self.error(path, node, problem)
            return None
        return file

    # ----------------------------------------------------------------- control

    def control(self, node: Node | None, data_listen: Address) -> Control:
        fields = self.fields(node, "control", _CONTROL_KEYS)
        if not fields:
            return _DEFAULTS.control
        listen_node = fields.get("listen")
        listen = self.address(listen_node, "control.listen", ephemeral=True)
        token_env = self.text(fields.get("token_env"), "control.token_env")
        token_file = self.text(fields.get("token_file"), "control.token_file")
        tokens_node = fields.get("tokens")
        token = None
        if token_env is not None and token_file is not None:
            self.error("control", fields["token_file"], "set token_env or token_file, not both")
        elif token_env is not None:
            token = self.env_token(token_env, fields["token_env"])
        elif token_file is not None:
            token = self.file_token(token_file, fields["token_file"])
        if tokens_node is not None and (token_env is not None or token_file is not None):
            both = "set tokens, or token_env / token_file (one admin token), not both"
            self.error("control.tokens", tokens_node, both)
        if listen is not None and listen_node is not None:
            tokenless = token_env is None and token_file is None and tokens_node is None
            self.control_listen(listen, listen_node, data_listen, tokenless)
        if tokens_node is not None:
            tokens = self.named_tokens(tokens_node)
        else:
            tokens = (Token("admin", token, "admin"),) if token is not None else ()
        return Control(
            listen=_or(listen, _DEFAULTS.control.listen),
            token=token,
            token_env=token_env,
            token_file=token_file,
            tls=self.listener_tls(fields.get("tls"), "control.tls"),
            tokens=tokens,
        )

    def named_tokens(self, node: Node) -> tuple[Token, ...]:
        """control.tokens: names and secrets unique, each with a role."""
        items = self.items(node, "control.tokens")
        if items is None:
            return ()
        if not items:
            self.error("control.tokens", node, "at least one token is required")
        tokens: list[Token] = []
        first_name: dict[str, int] = {}
        first_secret: dict[str, str] = {}  # secret -> the path of the first token holding it
        for item, path in items:
            token = self.named_token(item, path, first_name)
            if token is None:
                continue
            if token.secret in first_secret:
                same = f"the same secret as {first_secret[token.secret]}; every token must differ"
                self.error(path, item, same)
                continue
            first_secret[token.secret] = path
            tokens.append(token)
        return tuple(tokens)

    def named_token(self, node: Node, path: str, first_name: dict[str, int]) -> Token | None:
        fields = self.fields(node, path, _TOKEN_KEYS)
        if fields is None:
            return None
        name_node = self.required(fields, "name", path, node)
        what = "token names may only contain A-Z, a-z, 0-9, '_', '.' and '-'"
        name = self.pattern(name_node, f"{path}.name", _TOKEN_NAME, what)
        if name is not None and name_node is not None:
            if name in RESERVED_ACTORS:
                reserved = f"{name!r} is reserved (the actor of changes no token makes)"
                self.error(f"{path}.name", name_node, reserved)
                name = None
            elif name in first_name:
                first = f"first at line {first_name[name]}"
                self.error(f"{path}.name", name_node, f"duplicate token name {name!r} ({first})")
                name = None
            else:
                first_name[name] = _line(name_node)
        role = self.choice(self.required(fields, "role", path, node), f"{path}.role", TOKEN_ROLES)
        secret = self.token_secret(fields, path, node)
        if name is None or role is None or secret is None:
            return None
        return Token(name, secret, role)

    def token_secret(self, fields: dict[str, Node], path: str, node: Node) -> str | None:
        """One named token's secret, from exactly one of its token_env or token_file."""
        env_node, file_node = fields.get("token_env"), fields.get("token_file")
        if env_node is not None and file_node is not None:
            self.error(path, file_node, "set token_env or token_file, not both")
            return None
        if env_node is not None:
            env = self.text(env_node, f"{path}.token_env")
            return None if env is None else self.env_token(env, env_node, f"{path}.token_env")
        if file_node is not None:
            file = self.text(file_node, f"{path}.token_file")
            return None if file is None else self.file_token(file, file_node, f"{path}.token_file")
        self.error(path, node, "needs token_env or token_file")
        return None

    def control_listen(
        self, listen: Address, node: Node, data_listen: Address, tokenless: bool
    ) -> None:
        if tokenless and not _is_loopback(listen.host):  # an open control API: refuse to start
            needs = "a non-loopback control listener needs control.token_env or token_file"
            self.error("control.listen", node, needs)
        if listen.port and listen == data_listen:
            self.error("control.listen", node, f"{listen} is also the data-plane listen")

    def env_token(self, name: str, node: Node, where: str = "control.token_env") -> str | None:
        what = f"environment variable {name}"
        if name not in os.environ:
            self.error(where, node, f"{what} is not set")
            return None
        return self.bearer_token(os.environ[name], what, where, node)

    def file_token(self, name: str, node: Node, where: str = "control.token_file") -> str | None:
        path = os.path.join(self.base_dir, os.path.expanduser(name))
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except OSError as err:
            self.error(where, node, f"cannot read {path}: {err.strerror or err}")
            return None
        except UnicodeDecodeError:
            self.error(where, node, f"cannot read {path}: not UTF-8 text")
            return None
        return self.bearer_token(text, f"token file {path}", where, node)

    def bearer_token(self, raw: str, what: str, path: str, node: Node) -> str | None:
        token = raw.strip()
        if not token:
            self.error(path, node, f"{what} is empty")
            return None
        if not _BEARER.fullmatch(token):
            self.error(path, node, f"{what}: the token must be printable ASCII without spaces")
            return None
        return token

    # ----------------------------------------------------------------- TLS

    def listener_tls(self, node: Node | None, path: str) -> ListenerTls | None:
        """``tls: {cert, key}`` of a listener, checked by loading them as the listener will."""
        fields = self.fields(node, path, _LISTENER_TLS_KEYS)
        if node is None or fields is None:
            return None
        cert = self.tls_file(self.required(fields, "cert", path, node), f"{path}.cert")
        key = self.tls_file(self.required(fields, "key", path, node), f"{path}.key")
        if cert is None or key is None:
            return None
        tls = ListenerTls(cert[0], key[0], digest(cert[1], key[1]))
        self.try_tls(lambda: server_context(tls), fields, path)
        return tls

    def upstream_tls(self, node: Node | None, path: str) -> UpstreamTls | None:
        """A version's ``tls``: every key optional, ``{}`` verifies against the system's CAs."""
        fields = self.fields(node, path, _UPSTREAM_TLS_KEYS)
        if node is None or fields is None:
            return None
        if ("cert" in fields) != ("key" in fields):
            given = "cert" if "cert" in fields else "key"
            self.error(path, fields[given], "cert and key go together (a client certificate)")
        verify = _or(self.boolean(fields.get("verify"), f"{path}.verify"), True)
        if not verify and "ca" in fields:
            self.error(f"{path}.verify", fields["verify"], "false ignores ca: remove one of them")
        server_name = self.parsed(fields.get("server_name"), f"{path}.server_name", _server_name)
        files = {
            name: self.tls_file(fields[name], f"{path}.{name}")
            for name in ("ca", "cert", "key")
            if name in fields
        }
        if None in files.values():
            return None
        paths = {name: read[0] for name, read in files.items() if read is not None}
        contents = [read[1] for read in files.values() if read is not None]
        tls = UpstreamTls(
            ca=paths.get("ca"),
            server_name=server_name,
            cert=paths.get("cert"),
            key=paths.get("key"),
            verify=verify,
            digest=digest(*contents),
        )
        if files:  # `tls: {}` has nothing to check (the system's CAs take ~30 ms to load)
            self.try_tls(lambda: client_context(tls), fields, path)
        return tls

    def tls_file(self, node: Node | None, path: str) -> tuple[str, bytes] | None:
        """A certificate or key file's absolute path (relative ones from the config's
        directory) and its bytes."""
        name = self.text(node, path)
        if name is None or node is None:
            return None
        if not name:
            self.error(path, node, "must not be empty")
            return None
        file = os.path.abspath(os.path.join(self.base_dir, os.path.expanduser(name)))
        try:
            return file, read_file(file, path)
        except TlsProblem as problem:
            self.error(path, node, problem.message)
            return None

    def try_tls(self, build: Callable[[], object], fields: dict[str, Node], path: str) -> None:
        """Build a context as the proxy will; a file that does not load is its key's error."""
        try:
            build()
        except TlsProblem as problem:
            self.error(f"{path}.{problem.field}", fields[problem.field], problem.message)

    # ----------------------------------------------------------------- services

    def services(self, node: Node | None, timeouts: Timeouts) -> tuple[Service, ...]:
        items = self.items(node, "services") if node is not None else None
        if items is None or node is None:
            return ()
        if not items:
            self.error("services", node, "at least one service is required")
        services: list[Service] = []
        first_line: dict[str, int] = {}
        for item, path in items:
            service = self.service(item, path, timeouts)
            if service is None:
                continue
            if service.name and service.name in first_line:
                first = f"first at line {first_line[service.name]}"
                self.error(
                    f"{path}.name", item, f"duplicate service name {service.name!r} ({first})"
                )
            first_line.setdefault(service.name, _line(item))
            services.append(service)
        return tuple(services)

    def service(self, node: Node, path: str, timeouts: Timeouts) -> Service | None:
        fields = self.fields(node, path, _SERVICE_KEYS)
        if fields is None:
            return None
        name_node = self.required(fields, "name", path, node)
        what = "service names may only contain a-z, 0-9 and '-'"
        name = self.pattern(name_node, f"{path}.name", _SERVICE_NAME, what)
        versions = self.versions(self.required(fields, "versions", path, node), f"{path}.versions")
        names = [version.name for version in versions] if versions else None
        baseline = self.version_ref(fields.get("baseline"), f"{path}.baseline", names)
        version_header = self.boolean(fields.get("version_header"), f"{path}.version_header")
        baseline = _or(baseline, names[0] if names else "")
        release = self.release(fields.get("release"), f"{path}.release", names, baseline)
        return Service(
            name=_or(name, ""),
            versions=versions or (),
            split=self.split(fields.get("split"), f"{path}.split", names),
            baseline=baseline,
            match=self.service_match(fields.get("match"), f"{path}.match"),
            fallback=self.fallback(fields.get("fallback"), f"{path}.fallback", names),
            timeouts=self.timeouts(fields.get("timeouts"), f"{path}.timeouts", timeouts),
            rules=self.rules(fields.get("rules"), f"{path}.rules", names),
            version_header=_or(version_header, True),
            load_balancing=_or(
                self.choice(fields.get("load_balancing"), f"{path}.load_balancing", LOAD_BALANCING),
                "round_robin",
            ),
            max_connections_per_endpoint=_or(
                self.integer(
                    fields.get("max_connections_per_endpoint"),
                    f"{path}.max_connections_per_endpoint",
                    0,
                ),
                0,
            ),
            health_check=self.health_check(fields.get("health_check"), f"{path}.health_check"),
            outlier_detection=self.outlier_detection(
                fields.get("outlier_detection"), f"{path}.outlier_detection"
            ),
            retries=self.retries(fields.get("retries"), f"{path}.retries"),
            source_digest=node_digest(node),
            release=release,
            mirror=self.mirror(fields.get("mirror"), f"{path}.mirror", names),
            reroute_tunnels=self.reroute_tunnels(
                fields.get("reroute_tunnels"), f"{path}.reroute_tunnels"
            ),
            decision_header=_or(
                self.boolean(fields.get("decision_header"), f"{path}.decision_header"), False
            ),
        )

    def release(
        self, node: Node | None, path: str, names: list[str] | None, baseline: str
    ) -> ReleaseSpec | None:
        """A service's release, validated by the engine's own validator (the API's too); each
        problem gets the line of the node at its path, or of the nearest one above it."""
        if node is None:
            return None
        lines: dict[str, int] = {}
        raw = self.plain(node, "", path, lines)
        try:
            return parse_release(raw, names, baseline)
        except InvalidRelease as exc:
            for where, message in exc.problems:
                line = _nearest_line(lines, where)
                self.errors.append((line, f"{_join(path, where)}: line {line}: {message}"))
            return None

    def plain(self, node: Node, relative: str, path: str, lines: dict[str, int]) -> object:
        """The node as plain data (what a JSON body would be), noting each path's line;
        duplicate and merge keys are errors here, like everywhere in the file."""
        lines[relative] = _line(node)
        if isinstance(node, SequenceNode):
            return [
                self.plain(item, f"{relative}[{index}]", f"{path}[{index}]", lines)
                for index, item in enumerate(node.value)
            ]
        if isinstance(node, MappingNode):
            entries = self.entries(node, path) or {}
            return {
                key: self.plain(value, _join(relative, key), _join(path, key), lines)
                for key, (_, value) in entries.items()
            }
        assert isinstance(node, ScalarNode)
        if node.tag == _INT:
            return self.int_value(node, path)
        if node.tag == _FLOAT:
            return _SCALARS.construct_yaml_float(node)
        if node.tag == _BOOL:
            return _SCALARS.construct_yaml_bool(node)
        if node.tag == _NULL:
            return None
        return str(node.value)

    def choice(self, node: Node | None, path: str, allowed: tuple[str, ...]) -> str | None:
        text = self.text(node, path)
        if text is not None and node is not None and text not in allowed:
            self.error(path, node, f"{text!r}: expected one of: {', '.join(allowed)}")
            return None
        return text

    def health_check(self, node: Node | None, path: str) -> HealthCheck | None:
        fields = self.fields(node, path, _HEALTH_CHECK_KEYS)
        if node is None or fields is None:
            return None
        what = "must start with '/' and be printable ASCII without spaces or '#'"
        check_path = self.pattern(fields.get("path"), f"{path}.path", _REQUEST_PATH, what)
        host = self.pattern(fields.get("host"), f"{path}.host", _BEARER, "not a valid Host")
        interval = self.duration(fields.get("interval"), f"{path}.interval")
        timeout = self.duration(fields.get("timeout"), f"{path}.timeout")
        healthy = self.integer(fields.get("healthy_threshold"), f"{path}.healthy_threshold", 1)
        unhealthy = self.integer(
            fields.get("unhealthy_threshold"), f"{path}.unhealthy_threshold", 1
        )
        default = HealthCheck()
        return HealthCheck(
            path=_or(check_path, default.path),
            interval=_or(interval, default.interval),
            timeout=_or(timeout, default.timeout),
            healthy_threshold=_or(healthy, default.healthy_threshold),
            unhealthy_threshold=_or(unhealthy, default.unhealthy_threshold),
            host=host,
        )

    def outlier_detection(self, node: Node | None, path: str) -> OutlierDetection:
        fields = self.fields(node, path, _OUTLIER_KEYS) or {}
        default = OutlierDetection()
        errors_5xx = self.integer(fields.get("consecutive_5xx"), f"{path}.consecutive_5xx", 0)
        connect_failures = self.integer(
            fields.get("consecutive_connect_failures"), f"{path}.consecutive_connect_failures", 0
        )
        base = self.duration(fields.get("base_ejection_time"), f"{path}.base_ejection_time")
        longest = self.duration(fields.get("max_ejection_time"), f"{path}.max_ejection_time")
        percent_node = fields.get("max_ejection_percent")
        percent = self.integer(percent_node, f"{path}.max_ejection_percent", 0)
        if percent is not None and percent_node is not None and percent > 100:
            self.error(f"{path}.max_ejection_percent", percent_node, "must be at most 100")
            percent = None
        return OutlierDetection(
            consecutive_5xx=_or(errors_5xx, default.consecutive_5xx),
            consecutive_connect_failures=_or(
                connect_failures, default.consecutive_connect_failures
            ),
            base_ejection_time=_or(base, default.base_ejection_time),
            max_ejection_time=_or(longest, default.max_ejection_time),
            max_ejection_percent=_or(percent, default.max_ejection_percent),
        )

    def retries(self, node: Node | None, path: str) -> Retries:
        fields = self.fields(node, path, _RETRY_KEYS) or {}
        attempts = self.integer(fields.get("attempts"), f"{path}.attempts", 0)
        return Retries(attempts=_or(attempts, Retries().attempts))

    def mirror(self, node: Node | None, path: str, names: list[str] | None) -> Mirror | None:
        fields = self.fields(node, path, _MIRROR_KEYS)
        if node is None or fields is None:
            return None
        to_node = self.required(fields, "to", path, node)
        to = self.version_ref(to_node, f"{path}.to", names)
        if to is not None and to_node is not None and names == [to]:
            self.error(f"{path}.to", to_node, "the only version cannot mirror to itself")
        percent = self.percent(fields.get("percent"), f"{path}.percent")
        body = self.integer(fields.get("max_body_bytes"), f"{path}.max_body_bytes", 0)
        in_flight = self.integer(fields.get("max_in_flight"), f"{path}.max_in_flight", 1)
        default = Mirror("")
        return Mirror(
            to=_or(to, ""),
            percent=_or(percent, default.percent),
            max_body_bytes=_or(body, default.max_body_bytes),
            max_in_flight=_or(in_flight, default.max_in_flight),
        )

    def percent(self, node: Node | None, path: str) -> float | None:
        """A share in percent: a number from 0 to 100."""
        if node is None:
            return None
        value: int | float | None
        if isinstance(node, ScalarNode) and node.tag == _INT:
            value = self.int_value(node, path)  # compared as an int: no overflow to float
            if value is None:
                return None
        elif isinstance(node, ScalarNode) and node.tag == _FLOAT:
            value = _SCALARS.construct_yaml_float(node)
        else:
            self.error(path, node, f"expected a number, got {_kind(node)}")
            return None
        if not 0 <= value <= 100:  # also refuses nan
            self.error(path, node, "must be between 0 and 100")
            return None
        return float(value)

    def reroute_tunnels(self, node: Node | None, path: str) -> RerouteTunnels | None:
        fields = self.fields(node, path, _REROUTE_KEYS)
        if node is None or fields is None:
            return None
        within = self.duration(fields.get("within"), f"{path}.within", positive=False)
        return RerouteTunnels(within=_or(within, RerouteTunnels().within))

    def fallback(self, node: Node | None, path: str, names: list[str] | None) -> str | None:
        fallback = self.version_ref(node, path, names)
        if fallback is not None and node is not None and names == [fallback]:
            self.error(path, node, "the only version cannot be its own fallback")
        return fallback

    def service_match(self, node: Node | None, path: str) -> ServiceMatch:
        fields = self.fields(node, path, _MATCH_KEYS) or {}
        host = self.parsed(fields.get("host"), f"{path}.host", parse_match_host)
        prefix = self.path_prefix(fields.get("path_prefix"), f"{path}.path_prefix")
        return ServiceMatch(host=_or(host, "*"), path_prefix=_or(prefix, "/"))

    def versions(self, node: Node | None, path: str) -> tuple[Version, ...] | None:
        entries = self.entries(node, path) if node is not None else None
        if entries is None or node is None:
            return None
        if not entries:
            self.error(path, node, "at least one version is required")
            return None
        versions: list[Version] = []
        for name, (key, value) in entries.items():
            version_path = _join(path, name)
            if not _VERSION_NAME.fullmatch(name):
                what = "version names may only contain A-Z, a-z, 0-9, '_', '.' and '-'"
                self.error(version_path, key, f"{name!r}: {what}")
            tls_node = _value_of(value, "tls")  # its other errors are endpoints()'s to report
            tls = self.upstream_tls(tls_node, f"{version_path}.tls")
            versions.append(Version(name, self.endpoints(value, version_path), tls))
        return tuple(versions)

    def endpoints(self, node: Node, path: str) -> tuple[Address, ...]:
        fields = self.fields(node, path, _VERSION_KEYS)
        listed = self.required(fields, "endpoints", path, node) if fields is not None else None
        items = self.items(listed, f"{path}.endpoints") if listed is not None else None
        if items is None or listed is None:
            return ()
        if not items:
            self.error(f"{path}.endpoints", listed, "at least one endpoint is required")
        endpoints: list[Address] = []
        for item, item_path in items:
            address = self.address(item, item_path)
            if address in endpoints:
                self.error(item_path, item, f"duplicate endpoint {address}")
            elif address is not None:
                endpoints.append(address)
        return tuple(endpoints)

    # ----------------------------------------------------------------- split

    def split(self, node: Node | None, path: str, names: list[str] | None) -> Split:
        fields = self.fields(node, path, _SPLIT_KEYS) or {}
        weights_node = fields.get("weights")
        if names is None:
            weights: dict[str, float] = {}  # the versions could not be read: nothing to check
        elif weights_node is None:
            weights = _default_weights(names)
        else:
            weights = self.weights(weights_node, f"{path}.weights", names)
        hash_on = self.one_or_many(fields.get("hash_on"), f"{path}.hash_on")
        sources = (self.hash_source(item, item_path) for item, item_path in hash_on)
        return Split(
            weights=weights,
            hash_on=tuple(source for source in sources if source is not None),
            sticky_cookie=self.sticky_cookie(fields.get("sticky_cookie"), f"{path}.sticky_cookie"),
            salt=_or(self.text(fields.get("salt"), f"{path}.salt"), ""),
        )

    def weights(self, node: Node, path: str, names: list[str]) -> dict[str, float]:
        entries = self.entries(node, path)
        if entries is None:
            return _default_weights(names)
        given: dict[str, float] = {}
        for name, (key, value) in entries.items():
            weight = self.weight(value, _join(path, name))
            if name not in names:
                self.error(_join(path, name), key, unknown_version(name, names))
            elif weight is not None:
                given[name] = weight
        if len(given) == len(entries) and (problem := split_problem(given)):
            self.error(path, node, problem)
        return all_weights(names, given)

    def hash_source(self, node: Node, path: str) -> HashSource | None:
        fields = self.fields(node, path, _HASH_KINDS)
        if fields is None:
            return None
        if len(fields) != 1:
            self.error(path, node, f"expected exactly one of: {', '.join(_HASH_KINDS)}")
            return None
        ((kind, value),) = fields.items()
        if kind == "client_ip":
            self.true(value, f"{path}.client_ip")
            return HashSource("client_ip")
        name = self.field_name(value, f"{path}.{kind}", kind)
        return HashSource(kind, name) if name is not None else None

    def sticky_cookie(self, node: Node | None, path: str) -> StickyCookie | None:
        fields = self.fields(node, path, _STICKY_KEYS)
        if node is None or fields is None:
            return None
        name = self.field_name(self.required(fields, "name", path, node), f"{path}.name", "cookie")
        max_age_node = fields.get("max_age")
        max_age = self.duration(max_age_node, f"{path}.max_age")
        if max_age is not None and max_age_node is not None and not max_age.is_integer():
            self.error(f"{path}.max_age", max_age_node, "must be a whole number of seconds")
        return StickyCookie(_or(name, ""), int(max_age) if max_age is not None else None)

    # ----------------------------------------------------------------- rules

    def rules(self, node: Node | None, path: str, names: list[str] | None) -> tuple[Rule, ...]:
        items = self.items(node, path) if node is not None else None
        rules = (self.rule(item, item_path, names) for item, item_path in items or ())
        return tuple(rule for rule in rules if rule is not None)

    def rule(self, node: Node, path: str, names: list[str] | None) -> Rule | None:
        fields = self.fields(node, path, _RULE_KEYS)
        if fields is None:
            return None
        version_node = self.required(fields, "version", path, node)
        version = self.version_ref(version_node, f"{path}.version", names)
        what = "rule names may only contain A-Z, a-z, 0-9, '_', '.' and '-'"
        name = self.pattern(fields.get("name"), f"{path}.name", _VERSION_NAME, what)
        where = f"{path}.match"
        conditions = self.fields(fields.get("match"), where, _CONDITION_KEYS) or {}
        return Rule(
            version=_or(version, ""),
            headers=self.field_matches(conditions.get("header"), f"{where}.header", "header"),
            cookies=self.field_matches(conditions.get("cookie"), f"{where}.cookie", "cookie"),
            query=self.field_matches(conditions.get("query"), f"{where}.query", "query"),
            path_prefix=self.path_prefix(conditions.get("path_prefix"), f"{where}.path_prefix"),
            methods=self.methods(conditions.get("method"), f"{where}.method"),
            sources=self.networks(conditions.get("source"), f"{where}.source"),
            name=name,
        )

    def field_matches(self, node: Node | None, path: str, kind: str) -> tuple[FieldMatch, ...]:
        items = self.one_or_many(node, path)
        matches = (self.field_match(item, item_path, kind) for item, item_path in items)
        return tuple(match for match in matches if match is not None)

    def field_match(self, node: Node, path: str, kind: str) -> FieldMatch | None:
        fields = self.fields(node, path, _FIELD_KEYS)
        if fields is None:
            return None
        name = self.field_name(self.required(fields, "name", path, node), f"{path}.name", kind)
        if sum(test in fields for test in _FIELD_TESTS) != 1:
            self.error(path, node, "expected exactly one of: value, regex, present")
        value = self.text(fields.get("value"), f"{path}.value")
        regex = self.regex(fields.get("regex"), f"{path}.regex")
        present = self.true(fields.get("present"), f"{path}.present")
        return FieldMatch(name, value, regex, present) if name is not None else None

    def regex(self, node: Node | None, path: str) -> re.Pattern[str] | None:
        text = self.text(node, path)
        if text is None or node is None:
            return None
        try:
            return re.compile(text)
        except re.error as err:
            self.error(path, node, f"invalid regular expression: {err}")
            return None

    def methods(self, node: Node | None, path: str) -> frozenset[str]:
        items = self.one_or_many(node, path)
        methods = (
            self.pattern(item, item_path, _TOKEN, "not an HTTP method") for item, item_path in items
        )
        return frozenset(method.upper() for method in methods if method is not None)

    def networks(self, node: Node | None, path: str) -> tuple[IPNetwork, ...]:
        items = self.one_or_many(node, path)
        networks = (self.parsed(item, item_path, _network) for item, item_path in items)
        return tuple(network for network in networks if network is not None)

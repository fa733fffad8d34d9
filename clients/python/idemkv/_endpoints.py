"""Endpoints as users write them, and the gRPC channels to them.

``host:port``, ``http://host:port`` or ``https://host:port`` (a trailing
``/`` allowed), as the Rust client and ``idemkv ctl`` take them. The scheme,
when written, decides plaintext or TLS; a bare ``host:port`` uses TLS when
the client has TLS settings or was given any ``https://`` endpoint, so the
addresses the cluster reports (its leader, its members) follow the user's
choice.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import grpc

from .errors import ConfigError

FORMS = "write host:port, http://host:port or https://host:port"
#: The client ports of the three-node cluster ``idemkv up`` starts.
DEFAULT_ENDPOINTS = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
#: Largest request or reply (the server's default cap on its client port).
MAX_MESSAGE = 16 * 1024 * 1024

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


@dataclass(frozen=True)
class Endpoint:
    """One endpoint, parsed: ``tls`` is True for https://, False for http://,
    None when no scheme was written."""

    authority: str
    tls: Optional[bool]


def parse(text: str) -> Endpoint:
    """Parse one endpoint; a ``ConfigError`` names it and the forms accepted."""
    t = text.strip()

    def bad(why: str) -> ConfigError:
        return ConfigError(f"endpoint {text!r}: {why} ({FORMS})")

    if not t:
        raise bad("empty")
    tls: Optional[bool] = None
    if t.startswith("https://"):
        tls, t = True, t[len("https://") :]
    elif t.startswith("http://"):
        tls, t = False, t[len("http://") :]
    elif "://" in t:
        raise bad(f"unknown scheme {t.split('://', 1)[0]}://")
    if t.endswith("/"):
        t = t[:-1]
    if any(c in t for c in "/?@"):
        raise bad("only a host and port, no path")
    m = _HOST_PORT.match(t)
    if not m:
        raise bad("no host and port" if ":" not in t else "not a host:port")
    if not 0 < int(m.group(2)) < 65536:
        raise bad("port out of range")
    return Endpoint(authority=t, tls=tls)


def parse_list(endpoints: Union[str, Sequence[str]]) -> List[Endpoint]:
    """A comma-separated string or a sequence of endpoints."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed = [parse(e) for e in items]
    if not parsed:
        raise ConfigError("no endpoints given")
    return parsed


def _read(path_or_pem: Union[str, bytes, "os.PathLike[str]"], name: str) -> bytes:
    if isinstance(path_or_pem, bytes):
        return path_or_pem
    try:
        with open(path_or_pem, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{name}: cannot read {os.fspath(path_or_pem)!r}: {e}") from e


PemSource = Union[str, bytes, "os.PathLike[str]"]


@dataclass(frozen=True)
class TLS:
    """TLS settings: the CA to trust (a file path or PEM bytes; None: the
    system's roots) and, for a cluster run with ``--client-auth``, a client
    certificate and key (both or neither)."""

    ca: Optional[PemSource] = None
    cert: Optional[PemSource] = None
    key: Optional[PemSource] = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("tls: cert and key go together (give both or neither)")
        return grpc.ssl_channel_credentials(
            root_certificates=None if self.ca is None else _read(self.ca, "tls.ca"),
            private_key=None if self.key is None else _read(self.key, "tls.key"),
            certificate_chain=None if self.cert is None else _read(self.cert, "tls.cert"),
        )

    @staticmethod
    def from_env() -> Optional["TLS"]:
        """``IDEMKV_TLS_CA`` (with ``IDEMKV_TLS_CERT`` and ``IDEMKV_TLS_KEY``),
        as the Rust client reads them; None when no CA is named."""
        ca = os.environ.get("IDEMKV_TLS_CA") or None
        cert = os.environ.get("IDEMKV_TLS_CERT") or None
        key = os.environ.get("IDEMKV_TLS_KEY") or None
        if ca is None:
            if cert or key:
                raise ConfigError("IDEMKV_TLS_CA: required with IDEMKV_TLS_CERT/IDEMKV_TLS_KEY")
            return None
        return TLS(ca=ca, cert=cert, key=key)


TLSArg = Union[None, bool, TLS]


class ChannelFactory:
    """Makes the channel to an address by the client's TLS choice (shared by
    the sync and asyncio clients, which pass their own grpc module)."""

    def __init__(self, endpoints: List[Endpoint], tls: TLSArg, options: Sequence[Tuple[str, Any]]):
        self.tls = TLS() if tls is True else (tls or None)
        for e in endpoints:
            if e.tls is False and self.tls is not None:
                raise ConfigError(
                    f"endpoint http://{e.authority} is plaintext but TLS settings were given; "
                    f"write https://{e.authority} or {e.authority}"
                )
        self.default_tls = self.tls is not None or any(e.tls for e in endpoints)
        # Keepalive first, so that ``channel_options`` given by the caller
        # (later wins) can change it: while calls are open, a ping after 2 s
        # without news, and the connection dropped when one goes unanswered
        # for 3 s. A frozen node (SIGSTOP, a hung host, dropped packets)
        # then fails the calls waiting on it in about 5 s, so they go on to
        # another node instead of waiting out their deadline (10 s), as in
        # the Rust client. Pings are not capped by the pings-without-data
        # rule, else the one gRPC sends to size its window leaves keepalive
        # none; idle connections send none.
        self.options = [
            ("grpc.keepalive_time_ms", 2000),
            ("grpc.keepalive_timeout_ms", 3000),
            ("grpc.http2.ping_timeout_ms", 3000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 0),
            *options,
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
        ]
        self._credentials: Optional[grpc.ChannelCredentials] = None

    def secure(self, e: Endpoint) -> bool:
        return e.tls if e.tls is not None else self.default_tls

    def credentials(self) -> grpc.ChannelCredentials:
        if self._credentials is None:
            self._credentials = (self.tls or TLS()).credentials()
        return self._credentials

    def open(self, module: Any, e: Endpoint, interceptors: Sequence[Any] = ()) -> Any:
        """A channel from ``module`` (``grpc`` or ``grpc.aio``) to ``e``."""
        kw = {"options": self.options}
        if module is not grpc and interceptors:
            kw["interceptors"] = list(interceptors)
        if self.secure(e):
            ch = module.secure_channel(e.authority, self.credentials(), **kw)
        else:
            ch = module.insecure_channel(e.authority, **kw)
        if module is grpc and interceptors:
            ch = grpc.intercept_channel(ch, *interceptors)
        return ch

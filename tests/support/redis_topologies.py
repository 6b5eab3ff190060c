"""Real Redis topologies on loopback for failover tests: Sentinel (a master, a replica and
three sentinels; optionally with passwords and TLS) and Cluster (three masters with a
replica each).

    with SentinelTopology() as redis:
        ... redis.url ...            # redis+sentinel://h:p,h:p,h:p/mymaster/0
        old = redis.master_port()
        redis.kill_master()          # SIGKILL, as a crash
        redis.wait_for_failover(old) # until the sentinels name the replica master

Synchronous (subprocesses and redis-cli), like ``redis_server``; every wait is on a
condition the servers report, bounded by a deadline.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.redis_server import RedisServerError, RedisServerProcess, free_port

SERVICE = "mymaster"
_REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def redis_cli(port: int, *command: str, password: str | None = None, timeout_s: float = 5.0) -> str:
    auth = ("-a", password, "--no-auth-warning") if password else ()
    result = subprocess.run(
        [_REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *auth, *command],
        capture_output=True,
        check=False,
        timeout=timeout_s,
        text=True,
    )
    return result.stdout.strip()


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> float:
    """Poll ``condition`` (a question to the servers) until true; the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise RedisServerError(f"not within {timeout_s}s: {what}")
        time.sleep(0.05)  # the pause between questions; bounded by the deadline
    return time.monotonic() - started


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A CA and a certificate it signed for 127.0.0.1, as redis-server and clients read them."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    now = datetime.datetime.now(datetime.UTC)

    def issue(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name | None,
        ca_key: ec.EllipticCurvePrivateKey,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if issuer is None:
            builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False,
            )
        return builder.sign(ca_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("tokengate test CA", ca_key, None, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue("127.0.0.1", key, ca.subject, ca_key)
    files = TlsFiles(directory / "ca.pem", directory / "redis.pem", directory / "redis.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return files


class SentinelTopology:
    """A master, one replica and three sentinels (quorum 2), failing over in ~2-4 s.

    ``master_password``: the master and replica require it (``requirepass``, ``masterauth``;
    the sentinels know it as ``auth-pass``). ``sentinel_password``: the sentinels require
    their own (the default user's password, and ``sentinel-pass`` among themselves). Both
    are set once a server is up (``RedisServerProcess`` checks it with a bare PING), so a
    ``restart()`` of a server comes back without them. ``tls``: every
    server also listens with TLS, replicates and is monitored over it, and the sentinels
    name masters by their TLS port; the plain ports stay for this helper's questions."""

    def __init__(
        self,
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        master_password: str | None = None,
        sentinel_password: str | None = None,
        tls: bool = False,
    ) -> None:
        self.master = RedisServerProcess()
        self.replica = RedisServerProcess()
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self._master_password = master_password
        self._sentinel_password = sentinel_password
        self._tls_dir = tempfile.TemporaryDirectory(prefix="tokengate-tls-") if tls else None
        self.tls: TlsFiles | None = None
        self._tls_ports: dict[int, int] = {}  # plain port -> TLS port
        self.sentinels: list[RedisServerProcess] = []

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL (``rediss+sentinel://`` with TLS) for tokengate."""
        hosts = ",".join(f"127.0.0.1:{self._announced(s)}" for s in self.sentinels)
        auth = f":{quote(self._master_password, safe='')}@" if self._master_password else ""
        query: dict[str, str] = {}
        if self._sentinel_password:
            query["sentinel_password"] = self._sentinel_password
        if self.tls is not None:
            query["ssl_ca_certs"] = str(self.tls.ca)
        scheme = "rediss+sentinel" if self.tls is not None else "redis+sentinel"
        tail = f"?{urlencode(query)}" if query else ""
        return f"{scheme}://{auth}{hosts}/{SERVICE}/0{tail}"

    def _announced(self, server: RedisServerProcess) -> int:
        """The port clients are told about: the TLS one with TLS."""
        return self._tls_ports.get(server.port, server.port)

    def _server(self, *args: str) -> RedisServerProcess:
        """A redis-server with this topology's password and TLS options, plus ``args``."""
        options: list[str] = []
        if self._master_password and "--sentinel" not in args:
            options += ["--masterauth", self._master_password]
        tls_port = None
        if self.tls is not None:
            tls_port = free_port()
            options += ["--tls-port", str(tls_port), "--tls-replication", "yes"]
            options += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            options += ["--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]
        config = self._sentinel_config() if "--sentinel" in args else None
        server = RedisServerProcess(config=config, args=(*options, *args))
        server.start()  # answers an unauthenticated PING: passwords are set once it has
        if tls_port is not None:
            self._tls_ports[server.port] = tls_port
        if self._master_password and "--sentinel" not in args:
            redis_cli(server.port, "CONFIG", "SET", "requirepass", self._master_password)
        return server

    def _sentinel_config(self) -> str:
        config = (
            f"sentinel monitor {SERVICE} 127.0.0.1 {self._announced(self.master)} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {self._down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} {self._failover_timeout_ms}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        if self._master_password:
            config += f'sentinel auth-pass {SERVICE} "{self._master_password}"\n'
        return config

    def _require_sentinel_password(self) -> None:
        """Each sentinel requires the password, then uses it with the others (until both
        are done, they cannot talk: ``start`` waits for them to know each other after)."""
        password = self._sentinel_password
        if not password:
            return
        for sentinel in self.sentinels:
            redis_cli(sentinel.port, "ACL", "SETUSER", "default", "resetpass", f">{password}")
        for sentinel in self.sentinels:
            self._ask_sentinel(sentinel, "SENTINEL", "CONFIG", "SET", "sentinel-pass", password)

    def _ask_server(self, server: RedisServerProcess, *command: str) -> str:
        return redis_cli(server.port, *command, password=self._master_password)

    def _ask_sentinel(self, sentinel: RedisServerProcess, *command: str) -> str:
        return redis_cli(sentinel.port, *command, password=self._sentinel_password)

    def start(self) -> SentinelTopology:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> SentinelTopology:
        if self._tls_dir is not None:
            self.tls = make_tls_files(Path(self._tls_dir.name))
        self.master = self._server()
        self.replica = self._server("--replicaof", "127.0.0.1", str(self._announced(self.master)))
        wait_until(
            lambda: (
                "master_link_status:up" in self._ask_server(self.replica, "INFO", "replication")
            ),
            "the replica is in sync",
        )
        for _ in range(3):
            self.sentinels.append(self._server("--sentinel"))
        self._require_sentinel_password()
        wait_until(
            lambda: all(
                "num-other-sentinels\n2" in self._ask_sentinel(s, "SENTINEL", "MASTER", SERVICE)
                for s in self.sentinels
            ),
            "the sentinels know each other",
        )
        return self

    def master_port(self) -> int:
        """The master's port as the sentinels name it (its TLS port with TLS)."""
        answer = self._ask_sentinel(
            self.sentinels[0], "SENTINEL", "get-master-addr-by-name", SERVICE
        )
        return int(answer.splitlines()[1])

    def kill_master(self) -> RedisServerProcess:
        """SIGKILL whichever server is master now; returns it."""
        port = self.master_port()
        victim = self.master if self._announced(self.master) == port else self.replica
        victim.kill()
        return victim

    def wait_for_failover(self, old_port: int, timeout_s: float = 30.0) -> float:
        """Until every sentinel names a master other than ``old_port`` (``master_port()``
        before the kill)."""
        return wait_until(
            lambda: all(self._names_master_other_than(s, old_port) for s in self.sentinels),
            "the sentinels promote the replica",
            timeout_s,
        )

    def _names_master_other_than(self, sentinel: RedisServerProcess, port: int) -> bool:
        answer = self._ask_sentinel(sentinel, "SENTINEL", "get-master-addr-by-name", SERVICE)
        lines = answer.splitlines()
        return len(lines) == 2 and lines[1] != str(port)

    def stop(self) -> None:
        for server in (*self.sentinels, self.master, self.replica):
            server.stop()
        if self._tls_dir is not None:
            self._tls_dir.cleanup()

    def __enter__(self) -> SentinelTopology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ClusterTopology:
    """Three masters with one replica each; a killed master's replica takes over after
    ``node_timeout_ms`` and an election (~2 s)."""

    def __init__(self, *, node_timeout_ms: int = 1000) -> None:
        self._node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServerProcess] = []

    @property
    def url(self) -> str:
        # Every node a seed: start-up survives any of them being down.
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> ClusterTopology:
        for _ in range(6):
            node = RedisServerProcess(
                args=(
                    *("--cluster-enabled", "yes"),
                    *("--cluster-config-file", "nodes.conf"),
                    *("--cluster-node-timeout", str(self._node_timeout_ms)),
                    # The bus port, explicitly: the default (port + 10000) overflows for
                    # the high ephemeral ports tests get.
                    *("--cluster-port", str(free_port())),
                    # A replica takes over however long ago it last heard its master.
                    *("--cluster-replica-validity-factor", "0"),
                )
            )
            node.start()
            self.nodes.append(node)
        created = subprocess.run(
            [
                _REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                *("--cluster-replicas", "1", "--cluster-yes"),
            ],
            capture_output=True,
            check=False,
            timeout=60,
            text=True,
        )
        if created.returncode != 0:
            raise RedisServerError(f"redis-cli --cluster create failed:\n{created.stdout}")
        wait_until(
            lambda: all(
                "cluster_state:ok" in redis_cli(n.port, "CLUSTER", "INFO") for n in self.nodes
            ),
            "the cluster is ok on every node",
        )
        wait_until(
            lambda: all(
                "master_link_status:up" in redis_cli(n.port, "INFO", "replication")
                for n in self.nodes
                if self._role(n) == "slave"
            ),
            "every replica is in sync",
        )
        return self

    def masters(self) -> list[RedisServerProcess]:
        return [n for n in self.nodes if n.running and self._role(n) == "master"]

    @staticmethod
    def _role(node: RedisServerProcess) -> str:
        for line in redis_cli(node.port, "ROLE").splitlines()[:1]:
            return line.strip()
        return ""

    def subscribed_to(self, channel: str) -> list[RedisServerProcess]:
        """The live nodes where a client is subscribed to ``channel`` (PUBSUB NUMSUB counts
        each node's own subscribers)."""
        return [
            node
            for node in self.nodes
            if node.running
            and redis_cli(node.port, "PUBSUB", "NUMSUB", channel).splitlines()[-1:] != ["0"]
        ]

    def master_of_slot(self, slot: int) -> RedisServerProcess:
        """The node serving ``slot`` now, as the cluster itself reports it."""
        live = next(n for n in self.nodes if n.running)
        for entry in redis_cli(live.port, "CLUSTER", "NODES").splitlines():
            fields = entry.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(n for n in self.nodes if n.port == port)
        raise RedisServerError(f"no master serves slot {slot}")

    def kill_master_of_slot(self, slot: int) -> RedisServerProcess:
        victim = self.master_of_slot(slot)
        victim.kill()
        return victim

    def wait_for_failover(
        self, slot: int, killed: RedisServerProcess, timeout_s: float = 30.0
    ) -> float:
        """Until ``slot`` is served by a node other than ``killed`` and every live node
        reports the cluster ok again (its replica promoted)."""

        def promoted() -> bool:
            try:
                serving = self.master_of_slot(slot)
            except RedisServerError:
                return False
            return serving is not killed and all(
                "cluster_state:ok" in redis_cli(n.port, "CLUSTER", "INFO")
                for n in self.nodes
                if n.running
            )

        return wait_until(promoted, "a replica takes over the killed master's slots", timeout_s)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> ClusterTopology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

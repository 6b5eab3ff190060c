"""Real Redis topologies on loopback for failover tests: Sentinel (a master, a replica and
three sentinels) and Cluster (three masters with a replica each).

    with SentinelTopology() as redis:
        ... redis.url ...            # redis+sentinel://h:p,h:p,h:p/mymaster/0
        redis.kill_master()          # SIGKILL, as a crash
        redis.wait_for_failover()    # until the sentinels name the replica master

Synchronous (subprocesses and redis-cli), like ``redis_server``; every wait is on a
condition the servers report, bounded by a deadline.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable

from tests.support.redis_server import RedisServerError, RedisServerProcess, free_port

SERVICE = "mymaster"
_REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def redis_cli(port: int, *command: str, timeout_s: float = 5.0) -> str:
    result = subprocess.run(
        [_REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *command],
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


class SentinelTopology:
    """A master, one replica and three sentinels (quorum 2), failing over in ~2-4 s."""

    def __init__(self, *, down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        self.master = RedisServerProcess()
        self.replica = RedisServerProcess()
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self.sentinels: list[RedisServerProcess] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> SentinelTopology:
        self.master.start()
        self.replica = RedisServerProcess(args=("--replicaof", "127.0.0.1", str(self.master.port)))
        self.replica.start()
        wait_until(
            lambda: "master_link_status:up" in redis_cli(self.replica.port, "INFO", "replication"),
            "the replica is in sync",
        )
        config = (
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {self._down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} {self._failover_timeout_ms}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        for _ in range(3):
            sentinel = RedisServerProcess(config=config, args=("--sentinel",))
            sentinel.start()
            self.sentinels.append(sentinel)
        wait_until(
            lambda: all(
                "num-other-sentinels\n2" in redis_cli(s.port, "SENTINEL", "MASTER", SERVICE)
                for s in self.sentinels
            ),
            "the sentinels know each other",
        )
        return self

    def master_port(self) -> int:
        answer = redis_cli(self.sentinels[0].port, "SENTINEL", "get-master-addr-by-name", SERVICE)
        return int(answer.splitlines()[1])

    def kill_master(self) -> RedisServerProcess:
        """SIGKILL whichever server is master now; returns it."""
        port = self.master_port()
        victim = self.master if self.master.port == port else self.replica
        victim.kill()
        return victim

    def wait_for_failover(self, old_port: int, timeout_s: float = 30.0) -> float:
        return wait_until(
            lambda: all(self._names_master_other_than(s, old_port) for s in self.sentinels),
            "the sentinels promote the replica",
            timeout_s,
        )

    @staticmethod
    def _names_master_other_than(sentinel: RedisServerProcess, port: int) -> bool:
        answer = redis_cli(sentinel.port, "SENTINEL", "get-master-addr-by-name", SERVICE)
        lines = answer.splitlines()
        return len(lines) == 2 and lines[1] != str(port)

    def stop(self) -> None:
        for server in (*self.sentinels, self.master, self.replica):
            server.stop()

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

"""A private ``ray start --head`` for tests that submit Ray jobs: free ports for everything, no auth, its own
temp dir, and a teardown that stops only this head.

The head runs with ``--block`` and is stopped by signalling that process group: ``ray stop`` would also kill
every other Ray instance of this user on the machine (other test sessions share CI and dev boxes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PORT_OPTIONS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` s pass
    (AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextlib.contextmanager
def local_head(tmp: Path, num_cpus: int = 2) -> Iterator[dict[str, str]]:
    """Yields the environment for ``ray job …`` commands against the head (``RAY_ADDRESS`` = dashboard)."""
    ports = free_ports(len(PORT_OPTIONS) + 1)
    # 100 worker ports clear of the ones just picked (Ray refuses overlaps)
    lo = next(
        b for b in range(ports[-1] % 20000 + 30000, 65000, 100) if not any(b <= p < b + 100 for p in ports)
    )
    ray_tmp = tempfile.mkdtemp(prefix="xr", dir="/tmp")  # Unix socket paths under it must stay < 108 bytes
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    args = [
        ray_bin(),
        "start",
        "--head",
        "--block",
        f"--num-cpus={num_cpus}",
        "--include-dashboard=true",
        "--disable-usage-stats",
        f"--temp-dir={ray_tmp}",
        f"--min-worker-port={lo}",
        f"--max-worker-port={lo + 99}",
    ]
    args += [f"{opt}={p}" for opt, p in zip(PORT_OPTIONS, ports, strict=False)]
    log = open(tmp / "ray_head.log", "w")  # noqa: SIM115 (closed below)
    head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env["RAY_ADDRESS"] = f"http://127.0.0.1:{ports[1]}"
    try:
        wait_for(
            lambda: (
                head.poll() is not None
                or subprocess.run(
                    [ray_bin(), "job", "list"], env=env, capture_output=True, timeout=60
                ).returncode
                == 0
            ),
            120,
            "the Ray head",
        )
        if head.poll() is not None:
            raise RuntimeError(f"ray start failed: {(tmp / 'ray_head.log').read_text()[-2000:]}")
        yield env
    finally:
        # only the `ray start --block` process: it drains the node through the GCS, then stops what it started
        # (signalling the whole group would kill the GCS first and leave it waiting for a minute)
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)

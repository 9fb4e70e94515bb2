"""Multi-node on a simulated cluster (docs/scale.md#multi-node): ``ray.cluster_utils.Cluster`` starts one
raylet per "node" on this machine (a head with no CPUs, so every task and Ray Train worker runs on a worker
node), and a node is removed in the middle of the work with ``cluster.remove_node``, which kills its raylet
and every worker process on it, as a lost machine would.

- Shard build: the first conversion a chosen node takes stalls half-way through its shard until the node is
  removed (a worker setup hook, below), so the loss lands mid-build every time; Ray retries that chunk on
  the surviving node, and every tar equals a clean inline build's byte for byte (sha256), every index,
  marker, manifest and mixture.json too but for wall times, the git commit and the output folder's path.
- Training: a debug stage-1 run on 2 workers (one per node) plus a spare node loses rank 1's node after step
  3; Ray Train (``FailureConfig.max_failures``) restarts the worker group from the step-2 checkpoint on the
  remaining nodes, and every step's data fingerprint equals an uninterrupted run's. Without a spare node, an
  elastic worker range (``min_workers=1``) restarts it on the one worker left, with the same fingerprints.

Every node of the simulated cluster shares this machine's disk, so the run root and the shard folder are
"shared storage" here; a real cluster needs a shared file system or an object store for both.
These tests start and stop their own cluster (``cluster.shutdown()``) and never touch another one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrate.callbacks import Callback

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

VICTIM_ENV = "XSAM_TEST_VICTIM_NODE"
MARKS_ENV = "XSAM_TEST_CONVERSION_MARKS"
BUILD_SOURCES = ["coco_panoptic", "coco_instance", "refcoco"]


# ---------------------------------------------------------------------------------------------- the cluster
def _start_cluster(worker_nodes: int):
    """A head without CPUs and ``worker_nodes`` nodes of 1 CPU each. Node death is noticed within ~1.5 s
    (health checks every 500 ms, 3 misses) instead of Ray's default ~30 s."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
        },
    )
    nodes = [cluster.add_node(num_cpus=1) for _ in range(worker_nodes)]
    cluster.wait_for_nodes()
    return cluster, nodes


@pytest.fixture
def cluster_factory(monkeypatch) -> Iterator:
    """``start(worker_nodes) -> (cluster, worker nodes)``; the test connects (``connect``) with the
    runtime_env it needs. The driver is disconnected and every cluster started is shut down after the test.

    The cluster lives under a private ``RAY_TMPDIR``: ``Cluster`` records its address in
    ``<temp>/ray/ray_current_cluster``, where a plain ``ray.init()`` of another session on this machine would
    find it and join it (and ``shutdown`` deletes that file, which may be another cluster's)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="xr", dir="/tmp")  # Unix socket paths under it must stay < 108 bytes
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    started = []

    def start(worker_nodes: int):
        cluster, nodes = _start_cluster(worker_nodes)
        started.append(cluster)
        return cluster, nodes

    try:
        yield start
    finally:
        ray.shutdown()
        for cluster in started:
            cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def connect(cluster, *, env_vars: dict[str, str], setup_hook: str | None = None) -> None:
    """Connect this process as the driver; ``env_vars`` (and the setup hook) reach every worker."""
    import ray

    runtime_env: dict = {"env_vars": env_vars}
    if setup_hook:  # imported before the driver's sys.path reaches the worker: name the checkout
        repo = str(Path(__file__).resolve().parents[2])
        runtime_env["env_vars"] = {
            **env_vars,
            "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
        }
        runtime_env["worker_process_setup_hook"] = setup_hook
    ray.init(address=cluster.address, log_to_driver=False, runtime_env=runtime_env)


# ---------------------------------------------------------------------------------------------- shard build
HOOK = f"{__name__}.stall_on_victim"


def stall_on_victim() -> None:
    """Worker-process setup hook (``runtime_env["worker_process_setup_hook"]``) for the build test.

    Every conversion first leaves ``<marks>/<source>-<split>-<chunk>@<node id>`` (wrapping
    :func:`pipelines.build.shards.convert_chunk`, what ``driver._convert_task`` calls). On the node named in
    ``$XSAM_TEST_VICTIM_NODE`` the conversion then stalls mid-write: after the chunk's first record went into
    the shard's temporary file, it leaves ``<marks>/stalled`` and sleeps until ``cluster.remove_node`` kills
    the process, so the node is lost with a conversion in flight and a half-written temporary on storage."""
    import ray

    from pipelines.build import shards

    victim, marks = os.environ.get(VICTIM_ENV), os.environ.get(MARKS_ENV)
    if not marks:
        return
    node = ray.get_runtime_context().get_node_id()
    convert_chunk, convert_one = shards.convert_chunk, shards._convert_one
    records = []

    def marked_convert_chunk(source, files, split, options, chunk, *rest):
        Path(marks, f"{source.name}-{split}-{chunk.index}@{node}").touch()
        return convert_chunk(source, files, split, options, chunk, *rest)

    def stalling_convert_one(*args):
        records.append(1)
        if len(records) == 2:  # the first record is in the temporary tar
            Path(marks, "stalled").touch()
            while True:
                time.sleep(0.2)
        return convert_one(*args)

    shards.convert_chunk = marked_convert_chunk
    if node == victim:
        shards._convert_one = stalling_convert_one


def _build(data_root: Path, out: Path):
    from pipelines.build.driver import build
    from pipelines.build_options import BuildOptions

    return build(str(data_root), str(out), sources=BUILD_SOURCES, options=BuildOptions(samples_per_shard=2))


def _outputs(out: Path) -> dict[str, object]:
    """Every file under a build output: shards and indexes by sha256, JSON files parsed with what
    legitimately differs between two builds taken out (wall times, the git commit, the output folder's own
    path, and the manifest digests that depend on them)."""
    got: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name == ".build.lock":
            continue
        rel = str(p.relative_to(out))
        if p.suffix != ".json":
            got[rel] = _sha256(p)
            continue
        obj = json.loads(p.read_text().replace(str(out), "<out>"))
        if p.name == "mixture.json":
            for stage in obj["stages"].values():
                for d in stage["datasets"]:
                    d.pop("manifest_sha256", None)
        elif isinstance(obj, dict):
            # code_version names the git commit, which other work may move between the two builds
            for volatile in ("wall_time_s", "seconds", "code_version"):
                obj.pop(volatile, None)
        got[rel] = obj
    return got


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _remove_victim_mid_build(cluster, victim, out: Path, marks: Path, seen: dict) -> None:
    """Watcher thread: once the victim stalls mid-write and at least one shard is complete, remove it."""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            tars = sorted(out.rglob("*.tar"))
            if (marks / "stalled").exists() and tars:
                seen["stalled"] = sorted(m.name for m in marks.glob(f"*@{victim.node_id}"))
                seen["tars_before"] = [str(t.relative_to(out)) for t in tars]
                seen["temporaries_before"] = [p.name for p in out.rglob(".tmp-*")]
                seen["manifests_before"] = len(list(out.rglob("manifest.json")))
                cluster.remove_node(victim)
                seen["removed"] = True
                return
            time.sleep(0.1)
    except BaseException as e:  # noqa: BLE001 (reported by the test body)
        seen["error"] = repr(e)


def test_build_survives_a_lost_node_byte_identical(demo_root, tmp_path, cluster_factory):
    _build(demo_root, tmp_path / "inline")  # the clean build: no Ray, one process
    want = _outputs(tmp_path / "inline")

    marks = tmp_path / "marks"
    marks.mkdir()
    cluster, (victim, survivor) = cluster_factory(2)
    connect(cluster, env_vars={VICTIM_ENV: victim.node_id, MARKS_ENV: str(marks)}, setup_hook=HOOK)
    seen: dict = {}
    watcher = threading.Thread(
        target=_remove_victim_mid_build, args=(cluster, victim, tmp_path / "ray", marks, seen), daemon=True
    )
    watcher.start()
    results = _build(demo_root, tmp_path / "ray")
    watcher.join(timeout=60)
    assert seen.get("removed") and "error" not in seen, (seen, sorted(os.listdir(marks)))
    assert {r.source for r in results} == set(BUILD_SOURCES)

    # the node was lost mid-build: mid-way through a shard (its temporary file written), with other shards
    # and manifests still to come
    assert len(seen["stalled"]) == 1 and len(seen["temporaries_before"]) == 1, seen
    stalled_chunk = seen["stalled"][0].split("@")[0]
    got = _outputs(tmp_path / "ray")
    all_tars = [k for k in got if k.endswith(".tar")]
    assert 1 <= len(seen["tars_before"]) < len(all_tars) and seen["manifests_before"] < len(BUILD_SOURCES)
    # Ray retried the lost chunk on the surviving node
    assert (marks / f"{stalled_chunk}@{survivor.node_id}").exists(), sorted(os.listdir(marks))
    # and the result is the clean build's, file for file (the lost node's temporary removed)
    assert sorted(got) == sorted(want)
    assert got == want


# ---------------------------------------------------------------------------------------------- training
class RecordNodesHoldOnce(Callback):
    """Every attempt, every rank: ``<stage>/.node-a<attempt>-rank<r>`` holds its Ray node id. On the first
    attempt only, after step ``step`` (and once what was reported is committed) every rank parks until Ray
    Train tears the worker group down, so the node can be removed at a known step."""

    def __init__(self, step: int):
        self.step = step

    def on_train_start(self, trainer) -> None:
        import ray

        node = ray.get_runtime_context().get_node_id()
        folder = trainer.plan.layout.local_dir()
        (folder / f".node-a{trainer.state.attempt}-rank{trainer.rank}").write_text(node)

    def on_step_end(self, trainer, step, metrics) -> None:
        if step != self.step or trainer.state.attempt != 0:
            return
        from tests.support.faults import _committed

        _committed()
        (trainer.plan.layout.local_dir() / f".held-rank{trainer.rank}").touch()
        while True:  # until the worker group is torn down after the node loss
            time.sleep(0.2)


def _run_stage1(shards: Path, run_root: Path, extra_callbacks=(), min_workers: int | None = None):
    from orchestrate.runner import RunArgs, default_callbacks, fit, prepare

    plan = prepare(
        RunArgs(
            stage=1,
            flavor="debug",
            shards=str(shards),
            run_root=str(run_root),
            num_workers=2,
            max_steps=6,
            checkpoint_every=2,
            max_failures=2,
            wandb_mode="disabled",
        )
    )
    return fit(plan, callbacks=[*default_callbacks(plan), *extra_callbacks], min_workers=min_workers)


@pytest.fixture(scope="module")
def reference_run(train_shards, tmp_path_factory) -> Path:
    """The uninterrupted run (2 workers, 6 steps) on a local Ray instance of its own; its run root."""
    import ray

    root = tmp_path_factory.mktemp("multinode_ref") / "run"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert _run_stage1(train_shards, root).metrics["step"] == 6
    finally:
        ray.shutdown()
    return root


def _lose_rank1_node_after_step3(cluster, shards: Path, run_root: Path, min_workers: int | None = None):
    """Run stage 1 with rank 1's node removed after step 3; returns (result, what the watcher saw)."""
    seen: dict = {}
    stage_dir = run_root / "stage1"
    stage_dir.mkdir(parents=True)
    watcher = threading.Thread(target=_remove_rank1_node, args=(cluster, stage_dir, seen), daemon=True)
    watcher.start()
    result = _run_stage1(shards, run_root, [RecordNodesHoldOnce(3)], min_workers=min_workers)
    watcher.join(timeout=60)
    assert seen.get("removed") and "error" not in seen, seen
    assert result.metrics["step"] == 6
    first = {r: (stage_dir / f".node-a0-rank{r}").read_text() for r in (0, 1)}
    assert len(set(first.values())) == 2 and seen["removed"] == first[1]  # one rank per node
    assert len(seen["checkpoints_before"]) == 1  # the step-2 checkpoint only: the restart redoes step 3
    assert _steps_logged(stage_dir / "metrics.jsonl") == [1, 2, 3, 3, 4, 5, 6]
    lineage = json.loads((stage_dir / "export" / "lineage.json").read_text())
    assert lineage["restarts"] == 1 and lineage["steps"] == 6
    return seen


def _remove_rank1_node(cluster, stage_dir: Path, seen: dict) -> None:
    """Watcher thread: once both ranks are parked after the step, remove the node rank 1 runs on."""
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if all((stage_dir / f".held-rank{r}").exists() for r in (0, 1)):
                node = (stage_dir / ".node-a0-rank1").read_text()
                victim = next(n for n in cluster.worker_nodes if n.node_id == node)
                seen["checkpoints_before"] = sorted(
                    p.name for p in stage_dir.glob("checkpoint_*") if p.is_dir()
                )
                cluster.remove_node(victim)
                seen["removed"] = node
                return
            time.sleep(0.2)
    except BaseException as e:  # noqa: BLE001 (reported by the test body)
        seen["error"] = repr(e)


def _steps_logged(metrics_jsonl: Path) -> list[int]:
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


def test_training_restarts_on_the_remaining_nodes_with_the_same_data(
    train_shards, tmp_path, cluster_factory, reference_run
):
    """Stage 1, 2 workers on 3 one-CPU nodes, checkpoints at steps 2, 4, 6: rank 1's node is removed after
    step 3; Ray Train restarts the group from the step-2 checkpoint on the two nodes left (the spare one
    included), and every step's fingerprint equals the uninterrupted run's."""
    from orchestrate.summary import compare_runs

    cluster, _ = cluster_factory(3)
    connect(cluster, env_vars={})
    seen = _lose_rank1_node_after_step3(cluster, train_shards, tmp_path / "run")
    stage_dir = tmp_path / "run" / "stage1"
    again = {r: (stage_dir / f".node-a1-rank{r}").read_text() for r in (0, 1)}
    assert len(set(again.values())) == 2 and seen["removed"] not in again.values()  # the nodes left

    same, report = compare_runs(str(reference_run), str(tmp_path / "run"), stage=1)
    assert same and "stage 1: same data (6 common steps, 0 differ" in report, report


def test_training_continues_on_fewer_workers_after_a_lost_node(
    train_shards, tmp_path, cluster_factory, reference_run
):
    """No spare node, an elastic worker range (``min_workers=1``: Ray Train v2 ``ScalingConfig(num_workers=
    (1, 2))``): after rank 1's node is lost, Ray Train restarts the group with the one worker the cluster
    still fits, which converts the 2-worker step-2 checkpoint (DeepSpeed universal), accumulates 2
    micro-batches per step, and trains on the uninterrupted run's global batches."""
    from orchestrate.summary import compare_runs

    cluster, _ = cluster_factory(2)
    connect(cluster, env_vars={})
    seen = _lose_rank1_node_after_step3(cluster, train_shards, tmp_path / "run", min_workers=1)
    stage_dir = tmp_path / "run" / "stage1"
    assert sorted(p.name for p in stage_dir.glob(".node-a1-rank*")) == [".node-a1-rank0"]  # one worker
    assert (stage_dir / ".node-a1-rank0").read_text() != seen["removed"]

    same, report = compare_runs(str(reference_run), str(tmp_path / "run"), stage=1)
    assert same and "stage 1: same data (6 common steps, 0 differ" in report, report

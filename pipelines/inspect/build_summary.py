"""Print what a build wrote: one line per (source, split) from the manifests, plus the mixture if present.

python -m pipelines.inspect.build_summary --out demo_out/shards
"""

from __future__ import annotations

import argparse

from pipelines import storage
from pipelines.errors import OutputError, run_cli
from pipelines.logs import add_verbosity_flags, configure_logging, verbosity
from pipelines.shard_store import list_manifests


def summarize(out_url: str) -> str:
    """The table; :class:`~pipelines.errors.OutputError` when ``out_url`` holds no built split."""
    fs, root = storage.fs_and_path(out_url)
    manifests = list_manifests(out_url)
    if not manifests:
        raise OutputError(
            f"--out {out_url}: no <source>/<split>/manifest.json under it (nothing built there)"
        )
    rows = [f"{'source/split':<32} {'samples':>8} {'skipped':>8} {'dropped':>8} {'shards':>7} {'MB':>8}"]
    for m in manifests:
        c = m.counts
        mb = sum(s.bytes for s in m.shards) / 1e6
        rows.append(
            f"{m.name:<32} {c['samples']:>8} {c['skipped']:>8} "
            f"{c['dropped_annotations']:>8} {len(m.shards):>7} {mb:>8.2f}"
        )
        for reason, n in m.skipped.items():
            rows.append(f"{'':<4}skipped {reason}: {n}")
    if fs.exists(f"{root}/mixture.json"):
        rows.append(f"mixture: {root}/mixture.json")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the shard folder or URI of a build")
    add_verbosity_flags(p)
    args = p.parse_args(argv)
    configure_logging(verbosity(args))
    print(summarize(args.out))  # the table asked for: stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

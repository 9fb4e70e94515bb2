"""Print what a build wrote: one line per (source, split) from the manifests, plus the mixture if present.

python -m pipelines.inspect.summary --out demo_out/shards
"""

from __future__ import annotations

import argparse

from pipelines import storage
from pipelines.shard_store import list_manifests


def summarize(out_url: str) -> str:
    fs, root = storage.fs_and_path(out_url)
    rows = [f"{'source/split':<32} {'samples':>8} {'skipped':>8} {'dropped':>8} {'shards':>7} {'MB':>8}"]
    for m in list_manifests(out_url):
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    print(summarize(p.parse_args().out))


if __name__ == "__main__":
    main()

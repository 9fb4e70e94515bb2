"""Write the embedded demo ``datas/`` tree: every source in its real on-disk format, synthetic images.

    python -m pipelines.demo_data --out demo_out/datas

Deterministic: the same seed writes the same bytes. Each source family owns its writer in
``pipelines/demo/<family>.py``; :data:`DEMO_WRITERS` lists them (a plain dict, like the source registry).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

from pipelines.demo import ade20k, coco, gcg, interactive, lisa, llava, lvis, refer, vgd

DEMO_WRITERS: dict[str, Callable[[Path, random.Random], None]] = {
    "coco": coco.write,
    "gcg": gcg.write,
    "refer": refer.write,
    "lisa": lisa.write,
    "vgd": vgd.write,
    "interactive": interactive.write,
    "llava": llava.write,
    "ade20k": ade20k.write,
    "lvis": lvis.write,
}


def write_demo(root: str | Path, seed: int = 0, families: list[str] | None = None) -> Path:
    """Write the demo tree under ``root`` (created if needed); returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in families or list(DEMO_WRITERS):
        # each family gets its own RNG so adding a family never changes another's bytes
        DEMO_WRITERS[name](root, random.Random(f"{seed}/{name}"))
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", help=f"comma list of {sorted(DEMO_WRITERS)} (default: all)")
    args = p.parse_args()
    root = write_demo(args.out, args.seed, args.families.split(",") if args.families else None)
    print(f"demo data written under {root}")


if __name__ == "__main__":
    main()

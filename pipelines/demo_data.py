"""Write the embedded demo ``datas/`` tree: every source in its real on-disk format, synthetic images.

    python -m pipelines.demo_data --out demo_out/datas

Deterministic: the same seed writes the same bytes. Each source family owns its writer in
``pipelines/demo/<family>.py``; :data:`DEMO_WRITERS` lists them (a plain dict, like the source registry).
"""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Callable
from pathlib import Path

from pipelines.demo import ade20k, coco, gcg, interactive, lisa, llava, lvis, refer, vgd
from pipelines.errors import DemoDataError, run_cli
from pipelines.logs import add_verbosity_flags, configure_logging, verbosity

logger = logging.getLogger(__name__)

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
    unknown = sorted(set(families or ()) - set(DEMO_WRITERS))
    if unknown:
        raise DemoDataError(
            f"unknown demo famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; known: {sorted(DEMO_WRITERS)}"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in families or list(DEMO_WRITERS):
        # each family gets its own RNG so adding a family never changes another's bytes
        DEMO_WRITERS[name](root, random.Random(f"{seed}/{name}"))
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", help=f"comma list of {sorted(DEMO_WRITERS)} (default: all)")
    add_verbosity_flags(p)
    args = p.parse_args(argv)
    configure_logging(verbosity(args))
    root = write_demo(args.out, args.seed, args.families.split(",") if args.families else None)
    logger.info("demo data written under %s", root)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

"""Padding fraction of micro-batches with and without length grouping.

    python -m bench.grouping [--batch-size 4] [--micro-batches 400] [--length-group 8]

Builds the demo shards (every source) into a temporary folder, runs the stage-3 loader with a transform that
only tokenizes (the debug tokenizer through ``XSamProcessor.tokenize``: the real chat template and
placeholders) and reports, per source and over all micro-batches, the share of padded token positions when
each micro-batch is right-padded to its longest sample — with ``length_group=G`` and with ``length_group=1``
(``main``).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections import defaultdict

from bench.loader import debug_tokenizer, full_processor
from pipelines.build import mixture_weights
from pipelines.inspect.cards import build_demo
from pipelines.loader import MixtureLoader


def padded_share(batches: list[list[int]]) -> float:
    """Padded positions / all positions of right-padded micro-batches."""
    total = sum(max(b) * len(b) for b in batches)
    return 1.0 - sum(sum(b) for b in batches) / total if total else 0.0


def run(shards: str, stage: int, batch_size: int, n: int, length_group: int) -> dict[str, list[list[int]]]:
    """Token lengths of the first ``n`` micro-batches, by source."""
    tokenize = full_processor(debug_tokenizer()).tokenize
    loader = MixtureLoader(
        shards,
        stage=stage,
        batch_size=batch_size,
        seed=0,
        length_group=length_group,
        transform=lambda s, _img: len(tokenize(s)["input_ids"]),
        collate=list,
    )
    out: dict[str, list[list[int]]] = defaultdict(list)
    for i, b in enumerate(loader):
        out[b.source].append(b.data)
        if i + 1 == n:
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=400)
    p.add_argument("--length-group", type=int, default=8)
    p.add_argument("--stage", type=int, default=3)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        shards = str(build_demo(tmp))
        mixture_weights.write(shards, mixture_weights.compute(shards))
        grouped = run(shards, a.stage, a.batch_size, a.micro_batches, a.length_group)
        plain = run(shards, a.stage, a.batch_size, a.micro_batches, 1)
    print(f"{'source':32s} {'batches':>7s} {'pad G=' + str(a.length_group):>9s} {'pad G=1':>9s}")
    for src in sorted(plain):
        print(
            f"{src:32s} {len(plain[src]):7d} {padded_share(grouped[src]):9.3f} {padded_share(plain[src]):9.3f}"
        )
    every_g = [b for bs in grouped.values() for b in bs]
    every_p = [b for bs in plain.values() for b in bs]
    print(f"{'all':32s} {len(every_p):7d} {padded_share(every_g):9.3f} {padded_share(every_p):9.3f}")


if __name__ == "__main__":
    main()

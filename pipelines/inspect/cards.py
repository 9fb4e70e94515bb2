"""Dataset cards (Hugging Face format), one per source: hand-written prose + numbers from the manifests.

    python -m pipelines.inspect.cards --out SHARDS [--cards-dir dataset_cards] [--note TEXT] [--readme]
    python -m pipelines.inspect.cards --demo [--cards-dir dataset_cards]     # the committed example cards

The prose of each source (what it is, where to get it, its license, the conversation form, recipe defaults and
our departures, pitfalls) lives in ``pipelines/inspect/card_texts/<source>.md``: a small YAML header (license,
task categories, source datasets, tags) and the markdown body. Every number in a card (samples per split,
skipped records and dropped annotations by reason, shards, bytes, masks, categories) is read from
``<out>/<source>/<split>/manifest.json`` here, never typed by hand; a source or split without a manifest still
gets its card, with "not built" in place of numbers. Rendering is a pure function of the manifests (no clock,
no absolute paths, no git hash), so the same manifests give byte-identical cards.

The card's ``configs`` list ``data_files`` globs relative to ``<out>/<source>/``: with ``--readme`` the card
is also written there as ``README.md``, and ``datasets.load_dataset("<out>/<source>")`` reads the shards with
it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from pipelines import storage
from pipelines.demo_data import write_demo
from pipelines.errors import CardTextError, OutputError, run_cli
from pipelines.inspect.hf import FEATURES_YAML
from pipelines.logs import add_verbosity_flags, configure_logging, verbosity
from pipelines.shard_store import list_manifests
from pipelines.sources import SOURCES

# Heavy imports (ray) are deferred into build_demo: only the demo build starts Ray.

logger = logging.getLogger(__name__)

CARD_TEXTS_PACKAGE = "pipelines.inspect.card_texts"
# The sections every source's prose must have (a test holds each card text to this list).
REQUIRED_SECTIONS = (
    "What it is",
    "Getting the data",
    "License",
    "Task and conversation form",
    "Recipe defaults and our departures",
    "Known pitfalls",
)
# Keys of the hand-written header that go into the card's YAML as they are, in this order.
_PASSTHROUGH_KEYS = ("license", "license_name", "license_link", "task_categories", "source_datasets", "tags")
# Hugging Face's size buckets (upper bounds exclusive), smallest first.
_SIZE_BUCKETS = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
)
TOP_CATEGORIES = 20  # rows of the "masks per category id" table
DEMO_NOTE = (
    "**Example card.** The numbers below come from the embedded demo data (`python -m pipelines.demo_data`: "
    "synthetic images of drawn shapes in this source's real file format), built with default options. They "
    "show the card's form, not the size of the real dataset. Regenerate the card from your own build with "
    "`python -m pipelines.inspect.cards --out <your shard folder>`."
)
NUMBER_COLUMNS = (
    ("samples", "samples"),
    ("records in", "records_in"),
    ("skipped", "skipped"),
    ("dropped annotations", "dropped_annotations"),
    ("shards", None),
    ("bytes", None),
    ("masks", "masks"),
    ("regions", "regions"),
    ("user turns", "turns"),
)


@dataclass
class CardText:
    """One source's hand-written part: header fields and the markdown body."""

    source: str
    meta: dict
    body: str


@dataclass
class SourceInfo:
    """What a card needs to know about a source besides its prose: task and buildable splits."""

    name: str
    task: str
    splits: tuple[str, ...]
    registered: bool


@dataclass
class CardInputs:
    """Everything a card is rendered from. ``manifests``: split -> manifest dict (built splits only)."""

    text: CardText
    info: SourceInfo
    manifests: dict[str, dict] = field(default_factory=dict)
    note: str | None = None


# ---------------------------------------------------------------- card texts
def _split_front_matter(raw: str, where: str) -> tuple[dict, str]:
    m = re.match(r"^---\n(.*?)\n---\n(.*)$", raw, flags=re.S)
    if not m:
        raise CardTextError(f"{where}: must start with a '---' YAML header closed by '---'")
    meta = yaml.safe_load(m.group(1)) or {}
    if not isinstance(meta, dict):
        raise CardTextError(f"{where}: the YAML header is not a mapping")
    return meta, m.group(2).strip("\n") + "\n"


def card_text_names() -> list[str]:
    """Sources that have a card text file."""
    root = resources.files(CARD_TEXTS_PACKAGE)
    return sorted(p.name[:-3] for p in root.iterdir() if p.name.endswith(".md"))


def load_card_text(source: str) -> CardText:
    """Read and check ``card_texts/<source>.md``; :class:`CardTextError` names what is wrong."""
    path = resources.files(CARD_TEXTS_PACKAGE).joinpath(f"{source}.md")
    if not path.is_file():
        raise CardTextError(
            f"no card text for source {source!r}: add pipelines/inspect/card_texts/{source}.md"
        )
    return parse_card_text(source, path.read_text(encoding="utf-8"), f"card_texts/{source}.md")


def parse_card_text(source: str, raw: str, where: str) -> CardText:
    """Split and check a card text: header fields present, every required section there, no title."""
    meta, body = _split_front_matter(raw, where)
    for key in ("pretty_name", "task", "license", "task_categories", "source_datasets"):
        if key not in meta:
            raise CardTextError(f"{where}: header lacks {key!r}")
    prose = re.sub(r"^```.*?^```", "", body, flags=re.S | re.M)  # headings only outside code blocks
    headings = re.findall(r"^## (.+?)\s*$", prose, flags=re.M)
    missing = [s for s in REQUIRED_SECTIONS if s not in headings]
    if missing:
        raise CardTextError(f"{where}: missing sections {missing}")
    if re.search(r"^# ", prose, flags=re.M):
        raise CardTextError(f"{where}: the title (# …) is generated; start with ## sections")
    return CardText(source, meta, body)


def source_info(name: str, text: CardText) -> SourceInfo:
    """Task and splits from the registry when the source is registered; the card header's task otherwise."""
    src = SOURCES.get(name)
    if src is None:
        return SourceInfo(name, str(text.meta["task"]), (), registered=False)
    return SourceInfo(name, src.task, tuple(src.splits), registered=True)


# ---------------------------------------------------------------- manifests
def read_manifests(out_url: str) -> dict[str, dict[str, dict]]:
    """``{source: {split: manifest JSON}}`` for every ``<out>/<source>/<split>/manifest.json``."""
    found: dict[str, dict[str, dict]] = {}
    for m in list_manifests(out_url):
        found.setdefault(m.source, {})[m.split] = m.to_dict()
    return found


# ---------------------------------------------------------------- rendering helpers
def _n(v: int | float) -> str:
    return f"{int(v):,}"


def size_category(total_samples: int) -> str:
    for bound, name in _SIZE_BUCKETS:
        if total_samples < bound:
            return name
    return "n>1B"


def _split_order(info: SourceInfo, manifests: Mapping[str, dict]) -> list[str]:
    """Registry order first, then any built split the registry does not list (sorted)."""
    extra = sorted(s for s in manifests if s not in info.splits)
    return [*info.splits, *extra]


def split_numbers(manifest: dict) -> dict[str, int]:
    """The figures of one split's row, straight from its manifest."""
    counts = manifest["counts"]
    row = {key: int(counts.get(key, 0)) for _, key in NUMBER_COLUMNS if key}
    row["shards"] = len(manifest["shards"])
    row["bytes"] = sum(int(s["bytes"]) for s in manifest["shards"])
    return row


def _numbers_table(splits: list[str], manifests: Mapping[str, dict]) -> list[str]:
    head = "| split | " + " | ".join(name for name, _ in NUMBER_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(NUMBER_COLUMNS)
    lines = [head, rule]
    totals = dict.fromkeys([key or name for name, key in NUMBER_COLUMNS], 0)
    for split in splits:
        m = manifests.get(split)
        if m is None:
            lines.append(f"| {split} | " + " | ".join("not built" for _ in NUMBER_COLUMNS) + " |")
            continue
        row = split_numbers(m)
        cells = []
        for name, key in NUMBER_COLUMNS:
            k = key or name
            totals[k] += row[k]
            cells.append(_n(row[k]))
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    if len(manifests) > 1:
        lines.append(
            "| **all built** | " + " | ".join(_n(totals[key or name]) for name, key in NUMBER_COLUMNS) + " |"
        )
    return lines


def _reason_table(kind: str, splits: list[str], manifests: Mapping[str, dict]) -> list[str]:
    """Counts by reason (rows) and built split (columns) of ``skipped`` or ``dropped``."""
    built = [s for s in splits if s in manifests]
    reasons = sorted({r for s in built for r in manifests[s].get(kind, {})})
    if not reasons:
        return []
    lines = ["| reason | " + " | ".join(built) + " |", "|---|" + "---:|" * len(built)]
    for r in reasons:
        lines.append(
            f"| `{r}` | " + " | ".join(_n(manifests[s].get(kind, {}).get(r, 0)) for s in built) + " |"
        )
    return lines


def _category_section(splits: list[str], manifests: Mapping[str, dict]) -> list[str]:
    built = [s for s in splits if s in manifests]
    per_split = {s: manifests[s].get("category_counts", {}) for s in built}
    if not any(per_split.values()):
        return [
            "No mask of the built splits carries a category id (phrases are free text, or there are no masks)."
        ]
    distinct = ", ".join(f"{s}: {_n(len(per_split[s]))}" for s in built)
    totals: dict[str, int] = {}
    for counts in per_split.values():
        for cat, n in counts.items():
            totals[cat] = totals.get(cat, 0) + int(n)

    def cat_key(c: str) -> tuple:
        return (-totals[c], int(c) if c.lstrip("-").isdigit() else 0, c)

    top = sorted(totals, key=cat_key)[:TOP_CATEGORIES]
    lines = [
        f"Distinct category ids with at least one mask: {distinct}. Masks per category id (ids as in the "
        f"source's own category table), the {_n(len(top))} most frequent over all built splits:",
        "",
        "| category id | " + " | ".join(built) + " |",
        "|---:|" + "---:|" * len(built),
    ]
    for c in top:
        lines.append(f"| {c} | " + " | ".join(_n(per_split[s].get(c, 0)) for s in built) + " |")
    return lines


def _input_name(inp: dict) -> str:
    """A stable, machine-independent name for a build input: its path from the data-root layout on."""
    parts = inp["path"].replace("\\", "/").rstrip("/").split("/")
    # docs/contracts.md#data-root: every default path starts at an ``img_*`` task folder under the data root
    start = next((i for i, p in enumerate(parts) if p.startswith("img_")), len(parts) - 1)
    name = "/".join(parts[start:])
    return name + "/" if inp.get("kind") == "folder-listing" else name


def _provenance(splits: list[str], manifests: Mapping[str, dict]) -> list[str]:
    built = [s for s in splits if s in manifests]
    lines = [
        "| split | source version | schema | inputs (bytes, sha256) | folders | fingerprint |",
        "|---|---:|---:|---|---|---|",
    ]
    for s in built:
        m = manifests[s]
        inputs = "<br>".join(
            f"`{_input_name(i)}` ({_n(i['bytes'])}, `{i['sha256'][:16]}`)" for i in m.get("inputs", [])
        )
        dirs = "<br>".join(f"{k}: `{v}`" for k, v in sorted(m.get("dirs", {}).items()))
        lines.append(
            f"| {s} | {m.get('source_version')} | {m.get('schema')} | {inputs} | {dirs} | "
            f"`{str(m.get('fingerprint', ''))[:16]}` |"
        )
    infos = {s: manifests[s].get("info") for s in built if manifests[s].get("info")}
    if infos:
        lines += ["", "What locating the files found (`info` in the manifests):", ""]
        lines += [f"- {s}: `{json.dumps(v, sort_keys=True)}`" for s, v in infos.items()]
    options = {s: json.dumps(manifests[s].get("options", {}), sort_keys=True, indent=1) for s in built}
    lines += ["", "Build options:", ""]
    if len(set(options.values())) == 1:
        lines += ["```json", next(iter(options.values())), "```"]
    else:
        for s, text in options.items():
            lines += [f"{s}:", "", "```json", text, "```", ""]
    return lines


def _front_matter(inp: CardInputs, splits: list[str]) -> str:
    meta = inp.text.meta
    fm: dict = {"pretty_name": meta["pretty_name"]}
    for key in _PASSTHROUGH_KEYS:
        if key in meta:
            fm[key] = meta[key]
    if inp.manifests:
        fm["size_categories"] = [
            size_category(sum(split_numbers(m)["samples"] for m in inp.manifests.values()))
        ]
    # configs: one per source; one data_files entry per split, globs relative to <out>/<source>/.
    # Only built splits when any are built: a glob that matches nothing makes `load_dataset` fail.
    cfg_splits = [s for s in splits if s in inp.manifests] or splits
    # explicit column types: HF's webdataset builder would otherwise guess them from 5 samples
    # (pipelines/inspect/hf.py)
    fm["dataset_info"] = {"features": [dict(f) for f in FEATURES_YAML]}
    if cfg_splits:
        fm["configs"] = [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": f"{s}/{inp.info.name}-{s}-*.tar"} for s in cfg_splits],
            }
        ]
    return yaml.safe_dump(fm, sort_keys=False, allow_unicode=True, width=1000)


def render_card(inp: CardInputs) -> str:
    """The whole card as text; a pure function of its inputs."""
    info, manifests = inp.info, inp.manifests
    splits = _split_order(info, manifests)
    out = ["---", _front_matter(inp, splits).rstrip("\n"), "---", "", f"# {inp.text.meta['pretty_name']}", ""]
    split_list = ", ".join(f"`{s}`" for s in splits) if splits else "none registered yet"
    out += [
        f"Source `{info.name}` · task `{info.task}` · splits {split_list}.",
        "",
        "This card is generated by `python -m pipelines.inspect.cards` from the prose in "
        f"`pipelines/inspect/card_texts/{info.name}.md` and the build manifests; every number in it comes from a manifest.",
        "",
    ]
    if not info.registered:
        out += [f"> The source `{info.name}` is not in `pipelines.sources.SOURCES` of this checkout yet.", ""]
    if inp.note:
        out += [f"> {inp.note}", ""]
    out += [inp.text.body.rstrip("\n"), ""]

    out += ["## Build numbers", ""]
    if not manifests:
        out += [
            f"Not built: no `manifest.json` was found for `{info.name}`. Build it with "
            f"`python orchestrate/build_shards.py --data-root <datas> --out <shards> --sources {info.name} "
            f"--splits {','.join(splits) or '<split>'}`, then regenerate this card with "
            "`python -m pipelines.inspect.cards --out <shards>`.",
            "",
        ]
    out += _numbers_table(splits, manifests) + [""]
    if manifests:
        out += [
            "`records in` = `samples` + `skipped` (nothing is lost silently). `dropped annotations` are parts "
            "of samples that were still written. Every skipped record and dropped annotation is listed, with "
            "its key and detail, in `<split>/skipped.jsonl` beside the shards.",
            "",
        ]
        out += ["### Skipped records by reason", ""]
        out += (_reason_table("skipped", splits, manifests) or ["No record was skipped."]) + [""]
        out += ["### Dropped annotations by reason", ""]
        out += (_reason_table("dropped", splits, manifests) or ["No annotation was dropped."]) + [""]
        out += ["### Categories", ""] + _category_section(splits, manifests) + [""]
        out += ["### Provenance", ""] + _provenance(splits, manifests) + [""]
    out += _loading_section(info, splits)
    return "\n".join(out).rstrip("\n") + "\n"


def _loading_section(info: SourceInfo, splits: list[str]) -> list[str]:
    split = "train" if "train" in splits else (splits[0] if splits else "train")
    return [
        "## Loading the shards",
        "",
        f"Shards live at `<out>/{info.name}/<split>/{info.name}-<split>-NNNNNN.tar`; each sample is "
        "`<key>.jpg` (or `.png`: the original image bytes) plus `<key>.json` (the Sample, schema 1; masks are "
        "COCO compressed RLE at the original image size).",
        "",
        "```python",
        "import datasets, webdataset as wds",
        "from pipelines.inspect.hf import hf_features, load_shards",
        "from pipelines.schema import Sample, from_wds",
        f'ds = load_shards("<out>", "{info.name}")  # every built split, explicit column types',
        f'ds = datasets.load_dataset("<out>/{info.name}")  # the same, with this card saved there as README.md',
        f'ds = datasets.load_dataset("webdataset", data_files={{"{split}": "<out>/{info.name}/{split}/*.tar"}}, '
        "features=hf_features())",
        f'sample = Sample.from_dict(ds["{split}"][0]["json"])',
        f'for item in wds.WebDataset("<out>/{info.name}/{split}/{info.name}-{split}-000000.tar", shardshuffle=False):',
        "    sample, image_bytes = from_wds(item)",
        "```",
        "",
        "Pass `features=hf_features()` (or keep the card's `dataset_info`): without it, the `webdataset` builder "
        "guesses the column types from the first 5 samples, and a field that is empty there but set later "
        "(an `ignore` region, a `meta` key) or a shard mixing `.jpg` and `.png` members fails to load.",
        "",
        f"Preview rendered samples with `python -m pipelines.inspect.preview --out <out> --source {info.name}`.",
        "",
    ]


# ---------------------------------------------------------------- driver
def card_sources(manifests: Mapping[str, dict]) -> list[str]:
    """Every source that gets a card: the registry, every card text, every built source."""
    return sorted(set(SOURCES) | set(card_text_names()) | set(manifests))


def render_cards(
    out_url: str | None, note: str | None = None, sources: Iterable[str] | None = None
) -> dict[str, str]:
    """``{source: card text}`` for every source (or the given ones), numbers from ``out_url``'s manifests."""
    found = read_manifests(out_url) if out_url else {}
    cards = {}
    for name in sorted(sources) if sources is not None else card_sources(found):
        text = load_card_text(name)
        cards[name] = render_card(CardInputs(text, source_info(name, text), found.get(name, {}), note))
    return cards


def write_cards(cards: Mapping[str, str], cards_dir: str | Path) -> list[Path]:
    """Write ``<cards_dir>/<source>.md`` for each card; returns the paths."""
    d = Path(cards_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in sorted(cards.items()):
        p = d / f"{name}.md"
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    return paths


def write_readmes(cards: Mapping[str, str], out_url: str) -> list[str]:
    """Save each built source's card as ``<out>/<source>/README.md`` (its configs' globs are relative to
    it)."""
    fs, root = storage.fs_and_path(out_url)
    written = []
    for name, text in sorted(cards.items()):
        if fs.exists(f"{root}/{name}"):
            path = storage.join(root, name, "README.md")
            with storage.atomic_write(fs, path) as f:
                f.write(text.encode("utf-8"))
            written.append(path)
    return written


def build_demo(out: str | Path, data_root: str | Path | None = None) -> Path:
    """Write the demo data (unless ``data_root`` holds it) and build every source and split it has, inline."""
    from pipelines.build.driver import build

    root = Path(data_root) if data_root else write_demo(Path(out) / "datas")
    splits = sorted({s for src in SOURCES.values() for s in src.splits})
    build(str(root), str(Path(out) / "shards"), splits=splits)
    return Path(out) / "shards"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the shard folder of a build (holds <source>/<split>/manifest.json)")
    p.add_argument(
        "--cards-dir", default="dataset_cards", help="where to write <source>.md (default: %(default)s)"
    )
    p.add_argument("--note", help="a line quoted at the top of every card (e.g. what build this is)")
    p.add_argument("--readme", action="store_true", help="also write each card as <out>/<source>/README.md")
    p.add_argument(
        "--demo",
        action="store_true",
        help="build the embedded demo data in a temporary folder and write the example cards from it",
    )
    add_verbosity_flags(p)
    args = p.parse_args(argv)
    configure_logging(verbosity(args))
    if args.out and not args.demo and not _exists(args.out):
        raise OutputError(f"--out {args.out} does not exist")
    if args.demo:
        with tempfile.TemporaryDirectory(prefix="xsam-cards-demo-") as tmp:
            shards = build_demo(tmp)
            cards = render_cards(str(shards), note=args.note or DEMO_NOTE)
    elif args.out:
        cards = render_cards(args.out, note=args.note)
        if args.readme:
            for path in write_readmes(cards, args.out):
                print(f"wrote {path}")
    else:
        p.error("give --out SHARDS (or --demo)")
    for path in write_cards(cards, args.cards_dir):
        print(f"wrote {path}")
    not_built = [n for n, c in cards.items() if "\nNot built: " in c]
    if not_built:
        logger.warning("not built (cards carry 'not built'): %s", ", ".join(not_built))
    return 0


def _exists(out_url: str) -> bool:
    fs, root = storage.fs_and_path(out_url)
    return fs.exists(root)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

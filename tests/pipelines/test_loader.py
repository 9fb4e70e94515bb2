"""The training-side loader: one source per global step across ranks and workers, disjoint micro-batches
within a global batch, exact resume, empirical mixture frequencies, bad shards counted and replaced, fsspec
URIs; and the decode helpers it offers. Resume across world sizes: tests/pipelines/test_loader_elastic.py."""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines import mixture_file
from pipelines.build import mixture_weights
from pipelines.loader import LoaderError, MixtureLoader, decode
from pipelines.loader.order import step_sources
from pipelines.shard_store import index_shard
from tests.support.data import write_source


def key_and_crc(sample, image_bytes):
    """A transform that proves the image bytes belong to the JSON they came with."""
    return (sample.key, zlib.crc32(image_bytes))


def take(loader, n):
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory) -> Path:
    """Three sources of very different sizes and shard layouts, with mixture.json (stage 3 holds all
    three)."""
    out = tmp_path_factory.mktemp("shards")
    write_source(out, "coco_panoptic", [30, 30, 20])
    write_source(out, "refcoco", [12, 12])
    write_source(out, "lisa_reasonseg", [9])
    mixture_weights.write(str(out), mixture_weights.compute(str(out)))
    return out


def make(out, **kw):
    kw = {"stage": 3, "batch_size": 2, "seed": 7, "transform": key_and_crc, **kw}
    return MixtureLoader(str(out), **kw)


# ---------------------------------------------------------------------------------------------- single source
# per step
def test_every_global_step_is_single_source_across_ranks_and_workers(three_sources):
    steps = 24
    per_rank = [take(make(three_sources, rank=r, world_size=2, num_workers=2), steps) for r in range(2)]
    stage = mixture_file.load(str(three_sources)).stage(3)
    expected = [stage.names[i] for i in step_sources(7, np.arange(steps), stage.probabilities)]
    for s in range(steps):
        a, b = per_rank[0][s], per_rank[1][s]
        assert a.step == b.step == s
        assert a.source == b.source == expected[s]
        for batch in (a, b):
            assert len(batch.data) == 2
            assert all(key.startswith(batch.source.split("/")[0] + "/") for key, _ in batch.data)
    assert len({b.source for b in per_rank[0]}) == 3  # the test saw every source


def test_grad_accum_keeps_a_step_on_one_source(three_sources):
    batches = take(make(three_sources, grad_accum=3, num_workers=2), 30)
    by_step: dict[int, set] = {}
    for b in batches:
        by_step.setdefault(b.step, set()).add(b.source)
    assert sorted(by_step) == list(range(10)) and all(len(v) == 1 for v in by_step.values())


def test_source_frequencies_match_p():
    """Chi-square goodness of fit of 40,000 step draws to a recipe-like p (incl. a LISA-sized 0.34%)."""
    from scipy.stats import chi2

    p = np.array([0.45, 0.12, 0.1, 0.1, 0.0034, 0.2266])
    n = 40_000
    counts = np.bincount(step_sources(1234, np.arange(n), p), minlength=len(p))
    stat = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert stat < chi2.ppf(0.999, df=len(p) - 1), (counts, n * p)
    # a pure function of (seed, step): another call, or the same steps in another order, agree; another seed
    # differs
    forward = step_sources(1234, np.arange(n), p)
    assert (step_sources(1234, np.arange(n)[::-1].copy(), p) == forward[::-1]).all()
    assert (step_sources(1234, np.arange(5000, 6000), p) == forward[5000:6000]).all()
    assert (step_sources(1235, np.arange(n), p) != forward).any()


def test_loader_frequencies_follow_mixture(three_sources):
    loader = make(three_sources, batch_size=1)
    take(loader, 600)
    planned, seen = loader.planned, loader.seen()
    for name in planned:  # 600 draws: within 4.5 binomial standard deviations
        sd = (planned[name] * (1 - planned[name]) / 600) ** 0.5
        assert abs(seen[name] - planned[name]) < 4.5 * sd, (name, seen, planned)


# ---------------------------------------------------------------------------------------------- disjoint
# batches
def _pass_keys(out, world, workers, steps, **kw):
    return [
        [
            k
            for b in take(make(out, rank=r, world_size=world, num_workers=workers, **kw), steps)
            for k, _ in b.data
        ]
        for r in range(world)
    ]


def test_no_sample_read_by_two_ranks_in_a_pass(tmp_path):
    """64 samples in 3 unequal shards, 2 ranks x 2 workers, batch 4: 8 steps are exactly one pass."""
    keys = write_source(tmp_path, "coco_panoptic", [30, 20, 14])
    mixture_weights.write(str(tmp_path), mixture_weights.compute(str(tmp_path)))
    for length_group in (1, 8):
        per_rank = _pass_keys(tmp_path, 2, 2, 8, stage=1, batch_size=4, length_group=length_group)
        assert len(per_rank[0]) == len(per_rank[1]) == 32
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == keys  # every sample once
        # the order within a pass is shuffled, not the shard order
        assert per_rank[0] != sorted(per_rank[0])


def test_fewer_shards_than_consumers_split_inside_a_shard(tmp_path):
    keys = write_source(tmp_path, "coco_panoptic", [16])  # one shard, 4 consumers
    mixture_weights.write(str(tmp_path), mixture_weights.compute(str(tmp_path)))
    per_rank = _pass_keys(tmp_path, 2, 2, 4, stage=1, batch_size=2)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == keys


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core CI box is fine here
@pytest.mark.parametrize("workers,accum", [(0, 1), (2, 1), (3, 2)])
def test_resume_gives_the_batches_of_an_uninterrupted_run(three_sources, workers, accum):
    kw = {"num_workers": workers, "grad_accum": accum, "shuffle_window": 8}
    uninterrupted = take(make(three_sources, **kw), 48)
    first = make(three_sources, **kw)
    take(first, 40)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["micro_step"] == 40 and state["step"] == 40 // accum
    resumed = make(three_sources, **kw)
    resumed.load_state_dict(state)
    assert take(resumed, 8) == uninterrupted[40:]
    # the counters carry over too
    assert resumed.stats().batches == 48 == sum(resumed.stats().batches_by_source.values())


def test_state_must_fit_the_loader(three_sources):
    first = make(three_sources, num_workers=2)
    take(first, 6)
    state = first.state_dict()
    other_lanes = make(three_sources, num_workers=3)
    other_lanes.load_state_dict(state)  # worker count is no part of the state any more
    assert other_lanes.micro_step == 6
    with pytest.raises(ValueError, match="seed"):
        make(three_sources, num_workers=2, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch: 2 vs 4"):
        make(three_sources, rank=1, world_size=2, batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle_window"):
        make(three_sources, shuffle_window=5).load_state_dict(state)
    bad = {**state, "cursors": {**state["cursors"], "refcoco/train": state["cursors"]["refcoco/train"] + 2}}
    with pytest.raises(ValueError, match="cursors"):
        make(three_sources).load_state_dict(bad)


# ---------------------------------------------------------------------------------------------- bad shards
def _one_pass(loader, n_total):
    """Keys of the first ``n_total`` batches of size 1 of a one-rank, one-source loader: one pass over the
    dataset's stream, an unusable sample replaced by a draw."""
    return [k for b in take(loader, n_total) for k, _ in b.data]


def test_truncated_shard_is_skipped_counted_and_replaced(tmp_path):
    keys = write_source(tmp_path, "coco_panoptic", [10, 10, 10])
    mixture_weights.write(str(tmp_path), mixture_weights.compute(str(tmp_path)))
    tar = tmp_path / "coco_panoptic" / "train" / "coco_panoptic-train-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # cut in the middle of a member
    loader = make(tmp_path, stage=1, batch_size=1, shuffle_window=4)
    with pytest.warns(UserWarning, match="truncated_shard"):
        seen = _one_pass(loader, 30)
    lost = sorted(set(keys) - set(seen))
    assert len(seen) == 30  # every position of the pass got a usable sample
    assert 0 < len(lost) < 10 and all(k in keys[10:20] for k in lost)  # part of the middle shard survives
    # each lost sample's own position counted once, failed replacement draws (if any) once more each
    assert set(loader.stats().skipped) == {"truncated_shard"}
    assert loader.stats().skipped["truncated_shard"] >= len(lost)
    assert len(seen) - len(set(seen)) == len(lost)  # the replacements are samples the pass also holds
    assert any("truncated_shard" in e for e in loader.stats().errors)
    with pytest.raises(LoaderError, match="truncated_shard"):
        _one_pass(make(tmp_path, stage=1, batch_size=1, strict=True), 30)


def test_missing_shard_corrupt_json_and_bad_image_are_counted(tmp_path):
    keys = write_source(tmp_path, "coco_panoptic", [5, 5, 5])
    mixture_weights.write(str(tmp_path), mixture_weights.compute(str(tmp_path)))
    sdir = tmp_path / "coco_panoptic" / "train"
    (sdir / "coco_panoptic-train-000002.tar").unlink()
    # rewrite shard 0: sample 1's JSON is not JSON, sample 3's image is not an image (same member sizes)
    import tarfile

    src = (sdir / "coco_panoptic-train-000000.tar").read_bytes()
    with (
        tarfile.open(fileobj=io.BytesIO(src)) as t_in,
        tarfile.open(sdir / "coco_panoptic-train-000000.tar", "w") as t_out,
    ):
        for m in t_in.getmembers():
            data = t_in.extractfile(m).read()
            if m.name.endswith("000001.json"):
                data = b"{" + data[1:-1] + b"!"
            if m.name.endswith("000003.jpg"):
                data = b"\x00" * len(data)
            t_out.addfile(m, io.BytesIO(data))

    def decoding(sample, image_bytes):
        decode.decode_image(image_bytes)
        return (sample.key, 0)

    loader = make(tmp_path, stage=1, batch_size=1, transform=decoding)
    with pytest.warns(UserWarning):
        seen = _one_pass(loader, 15)
    good = set(keys[:5] + keys[5:10]) - {keys[1], keys[3]}
    assert len(seen) == 15 and set(seen) == good  # every usable sample at its own position, replacements too
    skipped = loader.stats().skipped
    assert set(skipped) == {"unreadable_shard", "corrupt_json", "corrupt_image"}
    assert skipped["unreadable_shard"] >= 5 and skipped["corrupt_json"] >= 1 and skipped["corrupt_image"] >= 1
    assert loader.stats().samples == 15


def test_a_dataset_with_no_usable_sample_fails_clearly(tmp_path):
    write_source(tmp_path, "coco_panoptic", [4])
    mixture_weights.write(str(tmp_path), mixture_weights.compute(str(tmp_path)))
    (tmp_path / "coco_panoptic" / "train" / "coco_panoptic-train-000000.tar").write_bytes(b"not a tar")
    with pytest.warns(UserWarning), pytest.raises(LoaderError, match="coco_panoptic/train: no usable sample"):
        take(make(tmp_path, stage=1, length_group=1), 1)
    # grouped: the lengths of the group are measured first, and that finds it (nothing counted yet)
    with pytest.raises(LoaderError, match="coco_panoptic/train: no usable sample.*unreadable_shard"):
        take(make(tmp_path, stage=1), 1)


def test_index_shard_reads_offsets(tmp_path):
    keys = write_source(tmp_path, "coco_panoptic", [3])
    path = str(tmp_path / "coco_panoptic" / "train" / "coco_panoptic-train-000000.tar")
    fs = fsspec.filesystem("file")
    idx = index_shard(fs, path, expected=3)
    assert (idx.n, idx.keys, idx.error, idx.img_ext) == (3, keys, None, ["jpg"] * 3)
    raw = Path(path).read_bytes()
    assert json.loads(raw[idx.json_off[1] : idx.json_off[1] + idx.json_len[1]])["key"] == keys[1]
    assert index_shard(fs, path, expected=4).error.startswith("3 complete samples")
    assert index_shard(fs, path + ".nope").reason == "unreadable_shard"


# ---------------------------------------------------------------------------------------------- exclusion,
# URIs, processor
def test_no_target_samples_are_not_trained_on(tmp_path):
    flagged = {0, 3, 4, 7, 10}
    write_source(tmp_path, "grefcoco", [6, 6], flagged=flagged)
    mixture_weights.write(str(tmp_path), mixture_weights.compute(str(tmp_path), stage3_extra=["grefcoco"]))
    loader = make(tmp_path, batch_size=1, shuffle_window=3)
    seen = [k for b in take(loader, 12) for k, _ in b.data]  # one pass: flagged positions get replacements
    usable = set(range(12)) - flagged
    assert {int(k.rsplit("/", 1)[1]) for k in seen} == usable  # each usable one at its own position
    assert loader.stats().filtered["no_target"] >= len(flagged) and loader.stats().skipped == {}
    # asking for them back
    loader = make(tmp_path, batch_size=1, exclude_flags=())
    assert len({k for b in take(loader, 12) for k, _ in b.data}) == 12


def test_shards_on_fsspec_uris(three_sources):
    local = take(make(three_sources, shuffle_window=5), 20)
    assert (
        take(
            MixtureLoader(
                f"file://{three_sources}",
                stage=3,
                batch_size=2,
                seed=7,
                transform=key_and_crc,
                shuffle_window=5,
            ),
            20,
        )
        == local
    )
    mem = fsspec.filesystem("memory")
    root = "/loader-test-shards"
    for p in three_sources.rglob("*"):
        if p.is_file():
            mem.pipe_file(f"{root}/{p.relative_to(three_sources)}", p.read_bytes())
    try:
        got = take(
            MixtureLoader(
                f"memory://{root}", stage=3, batch_size=2, seed=7, transform=key_and_crc, shuffle_window=5
            ),
            20,
        )
        assert got == local
    finally:
        mem.rm(root, recursive=True)


def test_with_the_model_processor(demo_root, tmp_path):
    processor = pytest.importorskip("xsam_model.builder").build_processor("debug")
    from pipelines.build.driver import build
    from pipelines.sources.base import BuildOptions

    out = tmp_path / "shards"
    build(
        str(demo_root),
        str(out),
        sources=["coco_panoptic", "coco_instance"],
        options=BuildOptions(samples_per_shard=3),
    )
    mixture_weights.write(str(out), mixture_weights.compute(str(out), stage3_extra=["coco_instance"]))
    loader = MixtureLoader(
        str(out), stage=3, batch_size=2, num_workers=1, transform=processor, collate=processor.collate
    )
    for b in take(loader, 3):
        size = processor.config.sam_size
        assert b.data["task"] == b.task == "genseg"
        assert b.data["extra_pixel_values"].shape == (2, 3, size, size)
        assert all(k.startswith(b.source.split("/")[0]) for k in b.data["keys"])
        assert all(m.shape[1:] == (size, size) for m in b.data["mask_labels"])


@pytest.mark.timeout(120)
def test_workers_survive_a_started_opencv_pool(three_sources):
    """OpenCV's thread pool does not survive fork(): a worker that touched cv2's thread count deadlocked."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    cv2.resize(np.zeros((1500, 1500, 3), np.uint8), (2500, 2500))  # the pool is running in this process

    def decoding(sample, image_bytes):
        return (sample.key, int(decode.resize(decode.decode_image(image_bytes), (40, 40)).sum()))

    try:
        assert len(take(make(three_sources, num_workers=2, transform=decoding), 4)) == 4
    finally:
        cv2.setNumThreads(before)


# ---------------------------------------------------------------------------------------------- decode
# helpers
def rle_to_mask(rle: dict) -> np.ndarray:
    """One RLE -> ``HxW`` 0/1 mask through :func:`decode.rle_counts` alone (the decoder under test)."""
    h, w = (int(v) for v in rle["size"])
    counts = decode.rle_counts(rle)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, size is {h}x{w}")
    values = np.zeros(len(counts), np.uint8)
    values[1::2] = 1
    return np.repeat(values, counts).reshape(w, h).T


def _random_masks(rng, n, h, w):
    masks = np.zeros((h, w, n), np.uint8, order="F")
    for i in range(n):
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        masks[y0 : rng.integers(y0 + 1, h), x0 : rng.integers(x0 + 1, w), i] = 1
        masks[:, :, i] ^= (rng.random((h, w)) < 0.02).astype(np.uint8)  # speckle: many runs, long counts
    masks[:, :, 0] = 0  # an empty mask
    return [{"size": r["size"], "counts": r["counts"].decode()} for r in mask_utils.encode(masks)], masks


def test_rle_decode_matches_pycocotools():
    rng = np.random.default_rng(0)
    rles, masks = _random_masks(rng, 6, 97, 131)
    for i, r in enumerate(rles):
        assert (rle_to_mask(r) == masks[:, :, i]).all()
    full = {"size": [3, 4], "counts": mask_utils.encode(np.ones((3, 4, 1), np.uint8, order="F"))[0]["counts"]}
    assert rle_to_mask(full).all()
    uncompressed = {"size": [2, 3], "counts": [1, 2, 3]}
    assert rle_to_mask(uncompressed).T.ravel().tolist() == [0, 1, 1, 0, 0, 0]
    # counts that do not fill the claimed size are detectable: they still sum to the true H*W
    assert decode.rle_counts({"size": [5, 5], "counts": rles[1]["counts"]}).sum() == 97 * 131


@pytest.mark.parametrize(
    "hw,longest", [((97, 131), 1024), ((131, 97), 64), ((480, 640), 1024), ((50, 50), 37)]
)
def test_masks_to_frame_equals_torch_nearest_exact(hw, longest):
    rng = np.random.default_rng(1)
    rles, masks = _random_masks(rng, 4, *hw)
    sh, sw = decode.scaled_size(*hw, longest)
    ref = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1))).unsqueeze(0),
        size=(sh, sw),
        mode="nearest-exact",
    )[0].numpy()
    out = decode.masks_to_frame(rles, (sh, sw), pad_to=longest)
    assert out.shape == (4, longest, longest)
    assert (out[:, :sh, :sw] == ref).all()
    assert not out[:, sh:].any() and not out[:, :, sw:].any()
    assert decode.masks_to_frame([], (sh, sw), pad_to=longest).shape == (0, longest, longest)
    buf = np.full((4, longest, longest), 7, np.uint8)  # a caller's buffer (e.g. shared memory): pad re-zeroed
    assert decode.masks_to_frame(rles, (sh, sw), pad_to=longest, out=buf) is buf and (buf == out).all()
    with pytest.raises(ValueError, match="expected"):
        decode.masks_to_frame(rles, (sh, sw), pad_to=longest, out=buf[:3])
    assert (decode.masks_to_frame_any(rles, (sh, sw)) == ref.any(0)).all()


def test_decode_image_equals_pil_and_rejects_garbage():
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for mode, fmt in (
        ("RGB", "JPEG"),
        ("L", "JPEG"),
        ("RGB", "PNG"),
        ("RGBA", "PNG"),
        ("L", "PNG"),
        ("P", "PNG"),
    ):
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, fmt)
        data = buf.getvalue()
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        got = decode.decode_image(data)
        assert got.shape == (37, 53, 3) and got.dtype == np.uint8
        assert (got == ref).all(), (mode, fmt)
    for bad in (b"", b"\xff\xd8\xff" + b"\x00" * 50, b"hello"):
        with pytest.raises(decode.ImageDecodeError):
            decode.decode_image(bad)


def test_image_inputs_shapes_normalisation_and_padding():
    arr = np.zeros((60, 90, 3), np.uint8)
    arr[..., 0] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    x = decode.image_inputs(buf.getvalue(), siglip_size=32, sam_size=64)
    assert x["pixel_values"].shape == (3, 32, 32) and x["extra_pixel_values"].shape == (3, 64, 64)
    assert x["scaled_size"] == (43, 64) and x["image_hw"] == (60, 90)
    assert np.allclose(x["pixel_values"][0], 1.0) and np.allclose(x["pixel_values"][1:], -1.0)
    sam = x["extra_pixel_values"]
    assert np.allclose(sam[0, :43], (1 - 0.485) / 0.229, atol=1e-5) and np.allclose(
        sam[2, :43], -0.406 / 0.225
    )
    assert not sam[:, 43:].any()  # zero pad after normalisation
    with pytest.raises(decode.ImageDecodeError, match="expected"):
        decode.image_inputs(buf.getvalue(), expect_hw=(61, 90))
    given = []
    y = decode.image_inputs(
        buf.getvalue(),
        siglip_size=32,
        sam_size=64,
        alloc=lambda shape, dtype: given.append(np.full(shape, np.nan, dtype)) or given[-1],
    )
    assert [g.shape for g in given] == [(3, 32, 32), (3, 64, 64)] and y["extra_pixel_values"] is given[1]
    assert np.array_equal(y["extra_pixel_values"], sam) and np.array_equal(
        y["pixel_values"], x["pixel_values"]
    )
    # the SAM frame is a single bilinear resize of the original, close to PIL's
    img = decode.decode_image(buf.getvalue())
    pil = np.asarray(Image.fromarray(img).resize((64, 43), Image.BILINEAR)).astype(int)
    assert np.abs(decode.resize(img, (43, 64), "bilinear").astype(int) - pil).max() <= 1

"""Source registry: a plain dict from source name (docs/contracts.md#source-names-and-tasks) to a Source
instance.

Adding a source: write ``pipelines/sources/<family>.py`` with a class following
:class:`pipelines.sources.base.Source`, then add its instance here.
"""

from __future__ import annotations

from pipelines.sources.ade20k import Ade20kInstance, Ade20kPanoptic, Ade20kSemantic
from pipelines.sources.base import Source
from pipelines.sources.coco import CocoInstance, CocoPanoptic
from pipelines.sources.gcg import FlickrGcg, GrandfGcg, PsgGcg, RefcocogGcg
from pipelines.sources.interactive import CocoInteractive
from pipelines.sources.lisa import LisaReasonSeg
from pipelines.sources.llava import LlavaInstruct, LlavaPretrain
from pipelines.sources.lvis import Lvis
from pipelines.sources.refer import SOURCES as REFER_SOURCES
from pipelines.sources.vgd import CocoVgd

SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        CocoPanoptic(),
        CocoInstance(),
        GrandfGcg(),
        PsgGcg(),
        RefcocogGcg(),
        FlickrGcg(),
        *REFER_SOURCES,
        LisaReasonSeg(),
        CocoVgd(),
        CocoInteractive(),
        LlavaPretrain(),
        LlavaInstruct(),
        Ade20kPanoptic(),
        Ade20kSemantic(),
        Ade20kInstance(),
        Lvis(),
    )
}

__all__ = ["SOURCES", "Source"]

"""The training loader: a stage's mixture of shards as one rank's micro-batches, in a world-size-free order
that resumes exactly on any world size (docs/architecture.md, "Loader").

    from pipelines.loader import MixtureLoader
    loader = MixtureLoader(shards, stage=3, batch_size=4, rank=r, world_size=n, num_workers=4, seed=0)

Modules: :mod:`~pipelines.loader.mixture_loader` (the loader), :mod:`~pipelines.loader.stream` (the sampling
contract, torch-free), :mod:`~pipelines.loader.order` (the data order), :mod:`~pipelines.loader.dataset` (one
dataset's reads), :mod:`~pipelines.loader.grouping` (length grouping), :mod:`~pipelines.loader.state`
(resume state), :mod:`~pipelines.loader.stats` (counters), :mod:`~pipelines.loader.workers` (the
DataLoader glue, the only one that imports torch), :mod:`~pipelines.loader.decode` / ``redraw`` /
``vgd_draw`` (what a sample becomes); the mixture file it reads is :mod:`pipelines.mixture_file`.
"""

from pipelines.errors import LoaderError
from pipelines.loader.mixture_loader import Batch, MixtureLoader
from pipelines.loader.stats import LoaderStats

__all__ = ["Batch", "LoaderError", "LoaderStats", "MixtureLoader"]

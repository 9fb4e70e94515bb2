"""Temporary alias of :mod:`pipelines.mixture_file` for ``pipelines/loader/stream.py`` only.

The mixture file's types and reader live in the core now (``pipelines.mixture_file``); the loader module that
still imports them from here is being split into a package in parallel, and this alias goes when it imports
``pipelines.mixture_file`` itself. Nothing else imports this module.
"""

from pipelines.mixture_file import DatasetWeight, Mixture, StageMixture, check_generations, load

__all__ = ["DatasetWeight", "Mixture", "StageMixture", "check_generations", "load"]

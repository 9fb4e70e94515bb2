"""Evaluation: score a ``predictions.jsonl`` (DESIGN §4.8) against built val shards.

Public surface: :func:`score_predictions` (what ``orchestrate/evaluate.py`` and inference call),
:class:`EvaluationError`, and the ground-truth/metric modules for whoever scores in other ways.
"""

from orchestrate.evaluation.errors import EvaluationError
from orchestrate.evaluation.run import score_predictions

__all__ = ["EvaluationError", "score_predictions"]

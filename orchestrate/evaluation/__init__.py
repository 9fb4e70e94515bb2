"""Evaluation: score a ``predictions.jsonl`` (docs/contracts.md, "Predictions and results") against built val
shards, run an export over them, compare with the paper's table.

The modules: :mod:`~orchestrate.evaluation.run` (:func:`~orchestrate.evaluation.run.score_predictions`, what
``orchestrate/evaluate.py`` and inference call), :mod:`~orchestrate.evaluation.export_inference` (an export
over the val shards), :mod:`~orchestrate.evaluation.paper_table` (the paper's numbers beside ours), the
ground-truth and metric modules for whoever scores in other ways, and :class:`EvaluationError`. The package
imports only its errors, so ``python -m orchestrate.evaluation.paper_table`` runs its module once.
"""

from orchestrate.evaluation.eval_errors import EvaluationError

__all__ = ["EvaluationError"]

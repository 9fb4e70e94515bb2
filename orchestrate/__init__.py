"""Thin entry points and per-stage training orchestration (Ray jobs)."""

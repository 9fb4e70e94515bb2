"""Shared test support, one module per kind of thing it holds: ``data`` (demo trees, built splits, hand-built
Samples and shards), ``model`` (tiny images and Samples for the model), ``evaluation`` (predictions and
ground-truth lines), ``exports`` (debug-model stage exports), ``faults`` (training callbacks that kill or hold
a worker) and ``ray_head`` (a private Ray head for job tests)."""

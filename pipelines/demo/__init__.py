"""Per-source-family writers of the demo data tree (see :mod:`pipelines.demo_data`)."""

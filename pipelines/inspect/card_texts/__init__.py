"""Hand-written prose of the dataset cards, one ``<source>.md`` per source (see
:mod:`pipelines.inspect.cards`).

Each file: a YAML header (``pretty_name``, ``task``, ``license`` [+ ``license_name``/``license_link`` when it
is ``other``], ``task_categories``, ``source_datasets``, ``tags``), then the sections listed in
``pipelines.inspect.cards.REQUIRED_SECTIONS`` as ``## `` headings. Never write build numbers here: the card
generator fills them from the manifests.
"""

"""rae's pipeline. The verbs live here, one module each (``encode``, ``sample``, ``decode``,
``importer``), beside the small modules every floor shares (``errors``, ``options``, ``presets``,
``dist``, ``progress``, ``flow``, ``digests``). The wings, from the ground up:

``models``     the networks (no I/O), the frozen encoders and pretrained-weight loading
``artifacts``  what rae writes and reads on disk: atomic files, manifests, the latent store, runs,
               checkpoints, image folders, the loading workers, outputs and their writers
``eval``       ``rae eval``: inputs, references, feature networks, one feature pass, the metrics,
               and the in-memory scoring the trainers use while they train
``train``      both trainers: one config module below their stages and steps, the data plan, the
               run log, tracking, the losses
``demo``       the embedded demonstration data and report

A module imports from its own floor or the ones below it, never above (tests/test_architecture.py)."""

__version__ = "0.1.0"

"""rae stages: one module per pipeline command (``encode``, ``train_decoder``, ``train_diffusion``,
``sample``, ``decode``, ``evaluate``), each with a config dataclass and ``run(config)``, over shared
pieces (models, flow-matching maths, latent store, manifests, checkpoints, distributed helpers)."""

__version__ = "0.1.0"

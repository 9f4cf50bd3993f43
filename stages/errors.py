"""User-facing errors. The CLI prints their message as one line and exits non-zero, no traceback."""


class RaeError(RuntimeError):
    """A mistake in the input or the environment that the user can fix (bad path, wrong artifact,
    missing weights). Its message must be one self-contained line."""


class ArtifactError(RaeError):
    """An artifact on disk is missing, unfinished, of the wrong kind or incompatible with the stage."""

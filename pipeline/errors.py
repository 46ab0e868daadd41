"""Errors the CLI turns into one clear line and a non-zero exit."""


class PipelineError(RuntimeError):
    """A problem with the run itself: a missing or incomplete parent stage, a refused overwrite."""

"""One exception hierarchy for the whole engine.

Every message says what is wrong, where (op, node, module), why it matters and what to do.
"""

__all__ = ["PruningError", "CaptureError", "AnalysisError", "SurgeryError", "VerificationError"]


class PruningError(Exception):
    """Root of every error raised by ``depgraph`` and ``pruners``."""


class CaptureError(PruningError):
    """The model could not be traced into a graph on the given example inputs."""


class AnalysisError(PruningError):
    """The captured graph could not be analysed (a rule failed on a node)."""


class SurgeryError(PruningError):
    """Removing channels failed; the model was left unchanged."""


class VerificationError(PruningError):
    """The pruned model does not run or does not match the masked original."""

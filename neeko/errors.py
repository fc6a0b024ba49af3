"""Typed errors. Each one a user can cause carries a message that says what to do."""


class NeekoError(Exception):
    """Base class of every error Neeko raises on purpose."""


class ModelLoadError(NeekoError):
    """A base model could not be found, converted or loaded."""


class BlockFormatError(NeekoError, ValueError):
    """A block or adapter file is not one this bank can take (format, shape, values)."""


class GateError(NeekoError, ValueError):
    """A gate names blocks that do not exist or holds weights that are not finite."""


class GenerationError(NeekoError, ValueError):
    """A generation request is malformed (empty messages, prompt too long, bad sampling)."""


class CardError(NeekoError, ValueError):
    """A character card is malformed, too large, or has a field Neeko cannot use as given."""

"""Exceptions that medfm reports to users as one line (the CLI prints them without a traceback)."""


class MedfmError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""


class BundleNotFoundError(MedfmError):
    """No bundle of that name or path."""


class WeightsError(MedfmError):
    """Weights missing, unreadable, unsafe, or not matching their registered hash."""

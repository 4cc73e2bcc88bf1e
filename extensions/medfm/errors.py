"""Exceptions that medfm reports to users as one line (the CLI prints them without a traceback)."""


class MedfmError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""


class BundleNotFoundError(MedfmError):
    """No bundle of that name or path."""


class WeightsError(MedfmError):
    """Weights missing, unreadable, unsafe, or not matching their registered hash."""


def innermost(error: BaseException) -> BaseException:
    """The original exception under the wrappers MONAI and ignite put around it."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def describe_error(error: BaseException) -> str:
    """One line for an unexpected exception: the innermost cause's type and first line (MONAI wraps config errors)."""
    cause = innermost(error)
    return f"{type(cause).__name__}: {first_line(cause) if str(cause).strip() else 'no details'}"


#: Environment variable that keeps the full traceback of a medfm error under ``monai.bundle``.
TRACEBACK_ENV = "MEDFM_TRACEBACK"


def report_bundle_errors_in_one_line() -> None:
    """Under MONAI's bundle command (``python -m monai.bundle``, also through ``torchrun``), end a run that failed
    with a :class:`MedfmError` (a missing checkpoint, a bad input) with that error's one line instead of a traceback
    in which MONAI's config wrappers bury it. Other errors, and every other program, keep Python's own report;
    ``MEDFM_TRACEBACK=1`` keeps it for medfm's errors too."""
    import os
    import sys

    if not sys.argv or not sys.argv[0].replace(os.sep, "/").endswith("monai/bundle/__main__.py"):
        return
    default_hook = sys.excepthook

    def hook(kind, error, trace):
        cause = innermost(error)
        if isinstance(cause, MedfmError) and os.environ.get(TRACEBACK_ENV, "") in ("", "0"):
            print(f"medfm: error: {first_line(cause)}", file=sys.stderr)
        else:
            default_hook(kind, error, trace)

    sys.excepthook = hook

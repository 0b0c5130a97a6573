"""The error every command turns into one line and exit code 2 (importing it costs nothing)."""


class SpecError(ValueError):
    """A user error in the experiment spec, the command line or a sweep's folder; the message names the field
    (or the file) and, where there is one, what to do instead."""

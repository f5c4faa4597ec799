"""One exception type for problems a user can fix; the CLI prints it as one line and exits non-zero."""


class DiffMASError(Exception):
    """A user-facing error: bad input, missing files, incompatible adapters or checkpoints, invalid config."""

    label = "error"  # how the command line's one line starts
    exit_code = 2

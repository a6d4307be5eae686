"""What a command's failure carries out of it: a message for a person and an exit code."""

from __future__ import annotations

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
#: The reader of stdout went away (``envctl ... | head``): what a shell shows for a command that
#: SIGPIPE ended (128 + 13), as for ``seq``, ``cat`` or ``git log`` in the same place.
EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A command cannot go on: ``envctl: <message>`` on stderr, then ``exit_code``."""

    def __init__(
        self,
        message: str,
        exit_code: int = EXIT_FAILURE,
        status: int | None = None,
        *,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status  # the HTTP status when the API refused
        self.server_message = server_message  # the API's own message, without decoration


class OutputClosedError(Exception):
    """stdout's reader went away in the middle of a command (a broken pipe).

    Raised in place of ``BrokenPipeError`` so that no layer between the command and ``main``
    (click handles an ``OSError`` of EPIPE in its own way) takes it for something else."""

"""The project's exception root and its process exit codes (one table for every console entry point).

Every error the project raises on purpose derives from `AapoError`; its `exit_code` is what the console
entry points return for it. Codes: 0 finished, 1 anything else, 2 bad configuration or input (checked
before any work starts where it can be), 3 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (the Slurm
scripts requeue on 3), 4 a checkpoint could not be saved (the previous checkpoint stays latest).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_SAVE_FAILED = 4


class AapoError(Exception):
    """Base of every deliberate aapo-megatron error; `exit_code` is the process exit status it maps to."""

    exit_code: int = EXIT_ERROR


class BadInputError(AapoError):
    """A configuration, a file or an argument the user gave is wrong (exit 2)."""

    exit_code = EXIT_BAD_INPUT

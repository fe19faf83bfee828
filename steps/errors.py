"""User errors: one line naming the file, line or key at fault, exit status 2, no traceback.

Exit status 2 is the contract with flows/: a stage that exits 2 failed on the user's input and is not
retried; any other non-zero status is treated as transient and retried with back-off.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake in the user's data, params or command line; the message says what to do."""


def run_main(main: Callable[[], None]) -> None:
    """Run a step's main(); a UserError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)

"""User errors: one line naming the file, line or key at fault, exit status 2, no traceback.

Exit status 2 is the contract with flows/: a stage that exits 2 failed on the user's input and is
not retried; any other non-zero status is treated as transient and retried with back-off. The
message itself travels to the flow in the stage's outcome record (steps/outcome.py), not through
its console.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake in the user's data, params or command line; the message says what to do."""

"""Errors a user can act on. Their message is shown as it is: one clear sentence, no traceback."""


class UserError(Exception):
    """Base of every error whose message is meant for the user (the CLI prints it and exits 2;
    the API answers 4xx with it; the UI shows it)."""

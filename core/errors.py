"""The one error type moeq raises for bad input."""


class UserError(Exception):
    """Bad input from the user: printed as one clear message, exit status 2."""

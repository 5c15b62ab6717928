"""One exception type for problems the user can fix; the CLI turns it into a one-line error, exit 2."""


class GiftError(ValueError):
    """Bad input or configuration (never a bug): shown to the user as a single line."""

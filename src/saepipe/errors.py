"""User-facing errors: the CLI turns these into exit code 2 and one line, never a traceback."""


class UserError(Exception):
    """Bad input from the user (params, files, model choice) that they can fix."""


def field_error(field: str, value: object, expected: str) -> UserError:
    """The one error shape for an invalid setting: which field, what it was, what was expected."""
    return UserError(f"{field}={value!r}: expected {expected}")

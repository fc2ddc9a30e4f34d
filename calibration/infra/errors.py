"""The base of every error whose message says what to fix (a file, row or field; a stale artifact; a
folder in use): the CLI shows these as one line instead of a traceback."""


class UserError(Exception):
    pass

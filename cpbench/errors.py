"""Errors that are the user's to fix (bad scenario, bad CSV, bad flag): exit code 2, one line, no traceback."""


class UserError(Exception):
    """A problem with the input (scenario, CSV, command line) rather than a bug; the CLI exits 2."""


class ScenarioError(UserError):
    """A malformed scenario file or ``--set`` override; the message names the file and the key."""


class ResultsError(UserError):
    """A results CSV that cannot be read, or two CSVs that cannot be compared."""

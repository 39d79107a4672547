"""The one exception class for a user's bad input to evaluation (a missing folder, a class count that does not
fit, an unreadable checkpoint...). `evaluate.py` prints its message as one line and exits with code 2; anything
else is a bug and keeps its traceback."""


class EvaluationInputError(ValueError):
    """Bad input, found before any feature is extracted wherever possible; the message names the file or key."""

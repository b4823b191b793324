"""The one user-error type and its exit code, shared by every stage and command.

An error caused by the user's input (params, data, checkpoints, models, images, a registry URI) is reported as
one line that names the culprit, with exit code 2; anything else is a bug and keeps its traceback.
Imports nothing, so the torch-free `kdpipe predict` path can use it.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user: the message is one line naming the file, key or URI at fault."""

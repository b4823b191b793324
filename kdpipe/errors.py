"""The one user-error type and its exit code, shared by every stage and command, and the interruption by a signal.

An error caused by the user's input (params, data, checkpoints, models, images, a registry URI) is reported as
one line that names the culprit, with exit code 2; anything else is a bug and keeps its traceback. A SIGINT or
SIGTERM is one line too, with the shell's exit code for that signal.
Imports nothing, so the torch-free `kdpipe predict` path can use it.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user: the message is one line naming the file, key or URI at fault."""


EXIT_SIGNAL_BASE = 128  # a stage ended by signal N exits 128 + N, as a shell reports it (SIGINT 130, SIGTERM 143)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached a running stage (args[0]: the signal number). A KeyboardInterrupt, so that no
    `except Exception` swallows it; the stage ends its MLflow run KILLED and says where it stopped (`at`, set by
    the training loop: "seed S, epoch E")."""

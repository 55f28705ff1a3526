"""The one exception type for mistakes a user can fix (bad config, data, paths).

Launchers print its message as a single line and exit non-zero; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem in the user's input, with a message that says how to fix it."""


class CheckpointSaveError(UserError):
  """A checkpoint could not be written (disk full, quota, permissions). The previous
  steps are untouched; the process should exit at once, without waiting for the
  checkpointer's background writers to wind down."""

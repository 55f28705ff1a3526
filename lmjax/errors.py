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


def check_ranges(section: str, config: object, positive: tuple[str, ...] = (),
                 non_negative: tuple[str, ...] = (), fractions: tuple[str, ...] = ()) -> None:
  """Config fields outside their range raise ValueError naming the field (the experiment
  loader turns it into one line): `positive` > 0, `non_negative` >= 0, `fractions` in [0, 1)."""
  for names, ok, what in ((positive, lambda v: v > 0, "must be positive"),
                          (non_negative, lambda v: v >= 0, "must be >= 0"),
                          (fractions, lambda v: 0 <= v < 1, "must be in [0, 1)")):
    for name in names:
      value = getattr(config, name)
      if not ok(value):
        raise ValueError(f"{section}.{name} {what}, got {value}")

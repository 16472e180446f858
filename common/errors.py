"""The project's error base: a UserError is the user's to fix (a bad config, input, checkpoint or
environment). `encdec` prints it as one line `encdec: error: ...` and exits 2; under Slurm the run
is then not restarted (it would fail the same way). Anything else is a bug or a crash: a traceback,
and a restart where the job script allows one."""


class UserError(ValueError):
    """A mistake in what the user gave (the message names the file, key or value)."""

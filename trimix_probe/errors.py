"""The errors a user can fix by changing their input; the CLI prints them as one line.

The bottom of the package: every module may import from here, and this module imports nothing
from the package.
"""


class InputError(ValueError):
    """Bad user input (a file, a model path, a prompt, an option value); the message names it and what is accepted."""


class ConfigError(ValueError):
    """A config (file, JSON or values) that cannot be used; the message is one line for the user."""


class PaddedBatchError(ValueError):
    """A batch whose mask the runtime cannot follow (padding inside a prompt, a custom 4D mask)."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, PaddedBatchError, InputError, FileNotFoundError)

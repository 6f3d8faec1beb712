"""The errors a user can fix by changing their input; the CLI prints them as one line."""

from .config import ConfigError
from .patch import PaddedBatchError


class InputError(ValueError):
    """Bad user input (a file, a model path, a prompt, an option value); the message names it and what is accepted."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, PaddedBatchError, InputError, FileNotFoundError)

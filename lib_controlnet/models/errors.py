"""Errors about ControlNet model files; their messages are one sentence a user can act on."""
from lib_controlnet.errors import UserError


class ModelFileError(UserError):
    """A model file or folder that cannot be used: empty, corrupt, unsafe, not a ControlNet, unsupported type."""


class ModelNotFoundError(UserError):
    """A model name that matches no file, or more than one."""

"""The one error type recipes raise: its message names the file, row and field at fault."""

from refcal.calibration.errors import UserError


class RecipeError(UserError, ValueError):
    pass

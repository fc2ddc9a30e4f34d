"""The one error type recipes raise: its message names the file, row and field at fault."""

from refcal.calibration.infra.errors import UserError


class RecipeError(UserError, ValueError):
    pass

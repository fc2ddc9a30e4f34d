"""The one error type recipes raise: its message names the file, row and field at fault."""


class RecipeError(ValueError):
    pass

"""What calibration raises (besides data.CalibrationDataError and recipe.RecipeError)."""


class CalibrationError(RuntimeError):
    """A run that cannot go on; the message names the layer, sample or setting."""

"""Non-learned contrast-synthesis baselines the CAE is compared against."""
from mrijax.baselines.lut import LUT, apply_lut, fit_lut
from mrijax.baselines.mimecs import Atlas, build_atlas, mimecs_synthesize

__all__ = ["LUT", "Atlas", "apply_lut", "build_atlas", "fit_lut", "mimecs_synthesize"]

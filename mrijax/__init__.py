"""mrijax: MRI contrast synthesis with the 3D convolutional autoencoder of Klingelhoefer & Rousseau."""
from mrijax.models import (VARIANTS, CAEConfig, build_model, count_params, get_config, init_variables,
                           input_shape, input_size, recognise_variant)

__all__ = ["VARIANTS", "CAEConfig", "build_model", "count_params", "get_config", "init_variables",
           "input_shape", "input_size", "recognise_variant"]
from mrijax.inference import synthesize  # noqa: E402

__all__ += ["synthesize"]

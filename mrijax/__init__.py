"""mrijax: MRI contrast synthesis with the 3D convolutional autoencoder of Klingelhoefer & Rousseau.

The names below are imported on first use (PEP 562), so `import mrijax.cli` stays light: a command restarts
itself with its allocator and parses its flags before JAX is loaded, and bad flags fail at once.
"""
import importlib

_EXPORTS = {
    **dict.fromkeys(("VARIANTS", "CAEConfig", "get_config", "input_shape", "input_size"), "mrijax.architectures"),
    **dict.fromkeys(("build_model", "count_params", "init_variables", "recognise_variant"), "mrijax.models"),
    "synthesize": "mrijax.inference",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mrijax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

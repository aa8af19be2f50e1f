"""Pathology foundation-model zoo: frozen image encoders behind one interface.

``import stfm.encoders`` does not import torch or timm; they are imported when a name below is first used.
"""

from stfm._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "DEFAULT_ENCODER": "_cards",
        "EncoderCard": "_cards",
        "get_card": "_cards",
        "list_encoders": "_cards",
        "register_encoder": "_cards",
        "ImageEncoder": "_base",
        "load_encoder": "_load",
        "load_weights_file": "_hub",
    },
)

"""Choice of the image-encoder inference path for this machine.

`make_encoder(loaded)` returns a callable (B,3,S,S) -> (B,256,64,64), or None for the model's
own fp32 eager encoder.
"""

from __future__ import annotations


def make_encoder(loaded):
    return None

"""Where the heat lies: each map's share of mass outside the head and on its rim.

The head mask and the shares are braincam/head.py's, the same ones /explain reports,
computed once per image on the decoded pixels the overlay is drawn on.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from braincam.head import OUTSIDE_THRESHOLD, head_mask, head_rim, heat_on_rim, heat_outside_head

__all__ = ["OUTSIDE_THRESHOLD", "heat_figures"]


def heat_figures(
    pixels: np.ndarray, maps: Mapping[str, np.ndarray]
) -> dict[str, dict[str, float | None]]:
    """{method: {"heat_outside_head", "heat_on_rim"}} for maps [H,W] of one image (any
    size: they are area-resized onto the mask's grid); None for a flat map or no head."""
    mask = head_mask(pixels)
    rim = head_rim(mask)
    return {
        name: {"heat_outside_head": heat_outside_head(cam, mask),
               "heat_on_rim": heat_on_rim(cam, rim)}
        for name, cam in maps.items()
    }

"""Gallery pictures: panels wrap into rows, each pasted whole under its caption."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vision_eff.gallery import image_grid, labelled_panels


def test_labelled_panels_wrap_into_rows():
    g = torch.Generator().manual_seed(0)
    panels = [(f"{k}. panel", torch.rand(4, 3, 8, 8, generator=g) * 2 - 1) for k in range(7)]
    one_row = labelled_panels(panels, nrow=2, scale=1)
    wrapped = labelled_panels(panels, nrow=2, scale=1, per_row=3)
    cell = np.asarray(image_grid(panels[0][1], 2))
    h, w = cell.shape[:2]
    cap, gap = 18, 12
    assert one_row.size == (7 * w + 6 * gap, h + cap)
    assert wrapped.size == (3 * w + 2 * gap, 3 * (h + cap) + 2 * gap)  # 7 panels, 3 to a row: 3 rows
    img = np.asarray(wrapped)
    for k, (_, x) in enumerate(panels):  # every grid sits whole below its caption, in reading order
        x0, y0 = (k % 3) * (w + gap), (k // 3) * (h + cap + gap) + cap
        assert np.array_equal(img[y0:y0 + h, x0:x0 + w], np.asarray(image_grid(x, 2)))
    with pytest.raises(ValueError, match="per_row"):
        labelled_panels(panels, nrow=2, per_row=0)

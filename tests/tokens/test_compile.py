"""Token reduction traces into one graph under torch.compile(fullgraph=True) (dynamo only, eager backend)."""
from __future__ import annotations

import pytest
import torch

import vision_eff as ve

from .families import images, tiny


@pytest.mark.parametrize("family,cfg", [("vit", ve.TokenMerge(r=8)), ("eva02_rope_swiglu", ve.TokenMerge(r=8)),
                                        ("deit3_layerscale", ve.TokenPrune(keep=0.5))])
def test_no_graph_breaks(family, cfg):
    model = tiny(family, depth=2)
    x = images(2)
    torch._dynamo.reset()
    with ve.patched(model, cfg), torch.no_grad():
        ref = model(x)
        explain = torch._dynamo.explain(model)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        assert explain.graph_count == 1
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(compiled(x), ref, rtol=0, atol=1e-6)  # state is reset between calls
    torch._dynamo.reset()

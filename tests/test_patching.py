from dataclasses import dataclass

import pytest
import torch
from torch import nn

import vision_eff as ve
from vision_eff._patching import PatchHandle


@dataclass(frozen=True)
class Scale:
    factor: float = 2.0
    key: str = "scale"

    def supports(self, obj):
        return None if isinstance(obj, nn.Linear) else "only nn.Linear"

    def apply(self, obj, handle: PatchHandle):
        f = self.factor
        handle.wrap_forward(obj, lambda orig: (lambda x: orig(x) * f))
        handle.set_attr(obj, "extra", nn.Identity())  # a new submodule
        handle.add_hook(obj.register_forward_pre_hook(lambda m, a: None))


def _model():
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def test_apply_and_remove_restore_exactly():
    m = _model()
    x = torch.randn(2, 4)
    ref = m(x)
    state_before = dict(m.__dict__)
    h = ve.apply(m, Scale(3.0))
    assert torch.allclose(m(x), ref * 3)
    h.remove()
    assert torch.equal(m(x), ref)
    assert "forward" not in m.__dict__ and "extra" not in m._modules
    assert not m._forward_pre_hooks
    assert set(m.__dict__) == set(state_before)


def test_applying_same_key_twice_replaces():
    m = _model()
    x = torch.randn(2, 4)
    ref = m(x)
    ve.apply(m, Scale(2.0))
    h2 = ve.apply(m, Scale(5.0))
    assert torch.allclose(m(x), ref * 5)  # not 10: the first application was removed
    h2.remove()
    assert torch.equal(m(x), ref)


def test_patched_context_and_global_remove():
    m = _model()
    x = torch.randn(2, 4)
    ref = m(x)
    with ve.patched(m, Scale(2.0)):
        assert torch.allclose(m(x), ref * 2)
    assert torch.equal(m(x), ref)
    ve.apply(m, Scale(2.0))
    ve.remove(m)
    assert torch.equal(m(x), ref) and ve.active_techniques(m) == []


def test_unsupported_model_names_the_reason():
    with pytest.raises(ve.UnsupportedModelError, match="only nn.Linear"):
        ve.apply(nn.Conv2d(1, 1, 1), Scale())
    with pytest.raises(TypeError, match="not a vision_eff technique"):
        ve.apply(_model(), object())
    with pytest.raises(ValueError, match="at least one technique"):
        ve.apply(_model())


def test_set_attr_restores_existing_attribute_and_parameter():
    m = _model()
    h = PatchHandle(m)
    old_w = m.weight
    h.set_attr(m, "weight", nn.Parameter(torch.zeros(3, 4)))
    h.set_attr(m, "training", False)
    h.remove()
    assert m.weight is old_w and m.training is True


def test_every_public_name_resolves():
    """``vision_eff.__all__`` lists only names that import (the lazy ones from their own modules), and an unknown
    name is an AttributeError, not an import error."""
    import importlib

    for name in ve.__all__:
        obj = getattr(ve, name)
        if name in ve._LAZY:
            assert obj is getattr(importlib.import_module(ve._LAZY[name]), name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        ve.not_a_name  # noqa: B018

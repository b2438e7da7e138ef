"""`vision-eff bench diffusion --rounds`: settings timed in alternation, set-up untimed, every patch undone."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vision_eff._timing import interleaved_rounds
from vision_eff.cache import bench


def test_paired_timing_cancels_drift_and_undoes_every_setting(monkeypatch):
    state = {"active": None, "calls": [], "applied": 0, "undone": 0}

    def setting(speed):
        def apply(pipe, args):
            assert state["active"] is None  # the previous setting was undone first
            state["active"], state["applied"] = speed, state["applied"] + 1

            def undo():
                state["active"], state["undone"] = None, state["undone"] + 1
            return undo
        return apply

    def fake_generate(pipe, labels, noise, steps, guidance, batch):
        rnd = len(state["calls"]) // 3  # three timed keys per round
        state["calls"].append(state["active"])
        assert batch == 2 and len(labels) == 2  # one batch, not all n images
        return None, (1.0 + rnd) / (state["active"] or 1.0)  # the machine slows down every round

    monkeypatch.setattr(bench, "_generate", fake_generate)
    args = SimpleNamespace(batch=2, steps=3, guidance=1.0, rounds=3)
    out = bench._paired_timing(None, {"x2": setting(2.0), "x4": setting(4.0)}, torch.arange(5), torch.zeros(5), args)
    assert len(state["calls"]) == 9  # no warm-up round: the main pass already warmed up
    assert state["calls"][:6] == [None, 2.0, 4.0, 4.0, 2.0, None]  # order reverses every other round
    assert out["x2"]["speedup"] == 2.0 and out["x4"]["speedup"] == 4.0  # drift cancels in paired ratios
    assert state["applied"] == state["undone"] == 6 and state["active"] is None


def test_interleaved_rounds_checks_its_arguments():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        interleaved_rounds(lambda k: 1.0, ["a"], 0, baseline="a")
    with pytest.raises(ValueError, match="baseline"):
        interleaved_rounds(lambda k: 1.0, ["a"], 1, baseline="b")


def test_rounds_flag_rejects_negative(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--rounds", "-1"])
    assert exc.value.code == 2 and "--rounds must be >= 0" in capsys.readouterr().err


def test_paired_over_chunked_uses_the_chunked_rows_own_rounds():
    """A '+ ChunkedFeedForward' row's ratio is taken per round over the chunked reference's time in that round."""
    chunked = bench.CHUNKED_REFERENCE
    ours = "StepCache x" + bench.CHUNKED_SUFFIX
    paired = {None: {"times": [10.0, 20.0, 30.0]}, chunked: {"times": [8.0, 16.0, 24.0]},
              ours: {"times": [4.0, 4.0, 12.0]}, "plain": {"times": [5.0, 10.0, 15.0]}}
    rows = [{"setting": "reference"}, {"setting": chunked}, {"setting": ours}, {"setting": "plain"}]
    bench._paired_over_chunked(rows, paired)
    assert rows[2]["paired_over_chunked"] == 2.0  # median of 2, 4, 2
    assert all("paired_over_chunked" not in r for i, r in enumerate(rows) if i != 2)
    rows = [{"setting": ours}]
    bench._paired_over_chunked(rows, {ours: paired[ours]})  # no chunked reference timed: no column
    assert "paired_over_chunked" not in rows[0]

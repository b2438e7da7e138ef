"""The main job's fast configuration: our scheduler (on the model's optimized schedule when one exists),
StepCache when asked for, and the pipeline left exactly as it was."""
import pytest
import torch

from vision_eff import zoo
from vision_eff.main_job import SCHEDULES, Configuration, fast_configuration, generate, reference_configuration
from vision_eff.samplers import PCMultistepScheduler
from vision_eff.samplers.schedules import read_schedule_file


@pytest.fixture(scope="module")
def pipe():
    return zoo.load_pipeline("shapes-unet")


def test_fast_configuration_uses_our_scheduler_and_the_optimized_schedule(pipe):
    path = SCHEDULES / "shapes-unet.json"
    doc = read_schedule_file(str(path)) if path.exists() else {"sigmas": {}}
    for n in (3, 8):
        cfg = fast_configuration("shapes-unet", steps=n)
        sched = cfg.make_scheduler(pipe)
        assert isinstance(sched, PCMultistepScheduler)
        # on a CPU the feed-forward is chunked (same outputs), on a GPU nothing is applied
        assert [type(t).__name__ for t in cfg.techniques] == ([] if torch.cuda.is_available() else ["ChunkedFeedForward"])
        sched.set_timesteps(n)
        if str(n) in doc["sigmas"]:
            assert "optimized schedule" in cfg.note
            torch.testing.assert_close(sched.sigmas[:n].double(), torch.tensor(doc["sigmas"][str(n)][:n], dtype=torch.float64),
                                       rtol=1e-5, atol=1e-6)
        else:
            assert "default spacing" in cfg.note


def test_generate_with_step_cache_leaves_the_pipeline_unpatched(pipe):
    labels = torch.tensor([0, 5])
    ref_cfg = Configuration("plain", 4, lambda p: PCMultistepScheduler.from_config(p.scheduler.config))
    before, _ = generate(pipe, ref_cfg, labels, seed=3, guidance=2.0)
    cached_cfg = fast_configuration("shapes-unet", steps=4, cache_interval=2)
    assert [type(t).__name__ for t in cached_cfg.techniques][:1] == ["StepCache"]
    cached, _ = generate(pipe, cached_cfg, labels, seed=3, guidance=2.0)
    after, _ = generate(pipe, ref_cfg, labels, seed=3, guidance=2.0)
    assert torch.equal(before, after)
    assert not torch.equal(cached, before) and torch.isfinite(cached).all()
    assert reference_configuration().steps == 50


def test_fast_configuration_chunked_feed_forward_keeps_the_images(pipe):
    """The chunked feed-forward of the CPU preset changes nothing but the speed (same images to float rounding);
    500-row slices so that the 3-image test batch is really cut."""
    from vision_eff import ChunkedFeedForward

    labels = torch.tensor([1, 2, 3])
    cfg = fast_configuration("shapes-unet", steps=3)
    plain = Configuration("plain", 3, cfg.make_scheduler)
    tiny_rows = Configuration("chunked", 3, cfg.make_scheduler, [ChunkedFeedForward(rows=500)])
    a, _ = generate(pipe, plain, labels, seed=4, guidance=2.0)
    b, _ = generate(pipe, tiny_rows, labels, seed=4, guidance=2.0)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)

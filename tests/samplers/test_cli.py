"""`vision-eff samplers optimize` and `vision-eff bench samplers` argument handling."""
import json

import pytest

from vision_eff.samplers import bench, cli


@pytest.mark.parametrize("args", [["optimize", "oracle", "--nfe", "0", "--out", "x.json"],
                                  ["optimize", "oracle", "--samples", "1", "--out", "x.json"],
                                  ["optimize", "oracle", "--history", "0", "--fit-coefficients", "--out", "x.json"],
                                  ["optimize", "oracle", "--restarts", "-1", "--out", "x.json"],
                                  ["optimize", "no-such-model", "--out", "x.json"]])
def test_optimize_rejects_bad_arguments(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_optimize_oracle_writes_a_loadable_file(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert cli.main(["optimize", "oracle", "--nfe", "3", "--samples", "12", "--evals", "6", "--reference-nfe", "16",
                     "--fit-coefficients", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert len(doc["sigmas"]["3"]) == 4 and "tuning RMSE" in printed
    assert "fitted_coefficients" in doc["report"]["3"]
    from vision_eff.samplers import PCMultistepScheduler

    s = PCMultistepScheduler.from_config(bench.BASE, schedule=str(out))
    s.set_timesteps(3)
    assert s.sigmas.tolist() == pytest.approx(doc["sigmas"]["3"], rel=1e-6)


def test_bench_rejects_same_tuning_and_evaluation_noise():
    with pytest.raises(SystemExit):
        bench.main(["--seed", "5", "--tune-seed", "5", "--models", ""])


def test_bench_rejects_negative_restarts():
    with pytest.raises(SystemExit) as e:
        bench.main(["--tune-restarts", "-1", "--models", ""])
    assert e.value.code == 2

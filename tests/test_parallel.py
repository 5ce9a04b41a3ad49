"""compare --jobs: independent runs in parallel processes, the devices dealt out, the cores shared."""
import json
import sys

import pytest

from src.commands.parallel import parse_devices, run_jobs, threads_per_job
from src.errors import UserError
from tests.helpers import run

# A stand-in for main.py: writes its arguments and OMP_NUM_THREADS to the file its first argument names.
RECORD = ("import json, os, sys; open(sys.argv[1], 'w').write(json.dumps([sys.argv[2:], os.environ['OMP_NUM_THREADS']]));"
          "sys.exit(3 if 'fail' in sys.argv else 0)")


def test_cores_are_shared_out_and_devices_parsed():
    assert (threads_per_job(2, cores=16), threads_per_job(3, cores=16), threads_per_job(4, cores=2)) == (8, 5, 1)
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"] and parse_devices(None) == []
    with pytest.raises(UserError, match="--devices"):
        parse_devices(",")


def test_jobs_get_devices_in_turn_and_every_job_runs(tmp_path, capsys):
    jobs = [(f"job {i}", [str(tmp_path / f"{i}.json"), "train", f"--seed={i}"]) for i in range(3)]
    run_jobs([sys.executable, "-c", RECORD], jobs, parallel=2, devices=["cuda:0", "cuda:1"])
    seen = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(3)]
    assert [args[-1] for args, _ in seen] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [args[1] for args, _ in seen] == ["--seed=0", "--seed=1", "--seed=2"]
    out = capsys.readouterr().out
    assert out.count("finished job") == 3


def test_cpu_jobs_share_the_threads_and_a_failure_is_reported_after_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    jobs = [("good", [str(tmp_path / "good.json")]), ("bad", [str(tmp_path / "bad.json"), "fail"]),
            ("late", [str(tmp_path / "late.json")])]
    with pytest.raises(UserError, match="1 of 3 runs failed.*bad exited with 3"):
        run_jobs([sys.executable, "-c", RECORD], jobs, parallel=2, devices=[])
    assert json.loads((tmp_path / "good.json").read_text())[1] == "4"  # 8 cores, 2 at a time
    assert (tmp_path / "late.json").is_file()  # the failure did not stop the others


@pytest.mark.slow
def test_compare_in_parallel_gives_the_sequential_results(capsys, synthetic_data, tmp_path):
    from tests.test_train import TINY

    data_dir = synthetic_data()
    common = ["compare", "--dataset", "iemocap", "--seeds", "1", "2", "--data-dir", data_dir, "--device", "cpu",
              "--epochs", "1", *TINY]
    code, _, err = run(capsys, *common, "--runs-dir", tmp_path / "sequential")
    assert code == 0, err
    code, out, err = run(capsys, *common, "--runs-dir", tmp_path / "parallel", "--jobs", "2")
    assert code == 0, err
    assert out.count("started compare_") == 4 and "| tie − compare_mult alone | 2 |" in out
    for name in ("compare_mult", "compare_causalmer_mult"):
        for seed in (1, 2):
            first, second = (json.loads((tmp_path / where / "iemocap" / name / f"seed{seed}" / "metrics.json").read_text())
                             for where in ("sequential", "parallel"))
            for which in ("best_loss", "best_acc"):
                assert first[which]["epoch"] == second[which]["epoch"]
                for prediction, values in first[which]["test"]["predictions"].items():
                    assert second[which]["test"]["predictions"][prediction] == pytest.approx(values, abs=1e-6)
                assert second[which]["test"]["loss"] == pytest.approx(first[which]["test"]["loss"], rel=1e-4)


def test_a_run_spec_reaches_the_child_process_whole():
    import main
    from src.commands.parallel import spec_argv
    from src.commands.train import RunSpec

    spec = RunSpec("mosi", "r", seed=4, backbone="dmd", config_file="c.yaml", overrides=["train.lr.backbone=0.1"],
                   runs_dir="runs", data_dir="d", data_file="d/m.pkl", data_format="mmsa", unaligned=True,
                   task="regression", epochs=2, clean_nonfinite=True, logger="tensorboard", compile=True,
                   init_from="p.pt")
    assert main.run_spec(main.build_parser().parse_args(spec_argv(spec, "cpu"))) == spec

"""main.sh and inference.sh keep their word: every option main.sh documents is one inference.sh takes."""
import re

import pytest

import main
from tests.helpers import REPO, run


def documented_options() -> list[list[str]]:
    """The options main.sh's header lists, e.g. ['--model', 'mult'], ['--set', 'train.epochs=5']."""
    header = next(line for line in (REPO / "main.sh").read_text().splitlines() if "options  passed to" in line)
    listed = header.split("e.g.", 1)[1]
    return [option.split() for option in re.split(r",\s*", listed.strip())]


def test_main_sh_documents_options():
    assert ["--unaligned"] in documented_options() and len(documented_options()) >= 4


@pytest.mark.parametrize("option", documented_options(), ids=" ".join)
def test_every_main_sh_option_is_an_eval_option(option):
    # inference.sh is main.sh with `eval`: the same positional arguments, then the options.
    args = main.build_parser().parse_args(["eval", "--dataset", "iemocap", "--name", "x", *option])
    assert args.command == "eval"


def fake_run(run_dir):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("dataset: iemocap\ndata: {dir: d, aligned: true, task: binary, "
                                         "clean_nonfinite: false}\nmodel: {name: backbone, backbone: mult, "
                                         "branches: {text: {kind: pool, hidden: 4}}}\ntrain: {epochs: 5}\n")
    return run_dir


def test_eval_refuses_run_flags_that_describe_another_run(capsys, tmp_path):
    fake_run(tmp_path / "iemocap" / "x" / "seed1")
    common = ["eval", "--dataset", "iemocap", "--name", "x", "--runs-dir", tmp_path]
    for flags, key in ((["--unaligned"], "data.aligned"), (["--model", "pmr"], "model.backbone"),
                       (["--set", "train.epochs=6"], "train.epochs"), (["--model", "causalmer", "--backbone", "dmd"],
                                                                       "model.backbone")):
        code, _, err = run(capsys, *common, *flags)
        assert code == 2 and key in err and "Traceback" not in err, (flags, err)
    code, _, err = run(capsys, *common, "--config", "c.yaml")
    assert code == 2 and "--config is for train" in err


def test_run_flags_that_agree_with_the_run_pass(tmp_path):
    from src.commands.evaluate import check_run_flags

    run_dir = fake_run(tmp_path / "r")
    args = main.build_parser().parse_args(["eval", "--dataset", "iemocap", "--name", "x", "--model", "mult",
                                           "--set", "train.epochs=5", "--set", "model.branches.text={kind: pool}",
                                           "--resume", "--logger", "none"])
    check_run_flags(run_dir, main.run_flags(args))  # no error: they all say what the run is

"""tandem-sim CLI: help everywhere, eval on a micro zoo, one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from sim.cli import main
from sim.zoo.build import ensure_zoo
from sim.zoo.recipe import micro_recipe


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def micro_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("zoohome")
    ensure_zoo(micro_recipe(), home=home, progress=False)
    return home


@pytest.mark.parametrize("args", [[], ["world"], ["zoo"], ["zoo", "eval"], ["zoo", "build"], ["world", "sample"]])
def test_help(args, capsys):
    code, out, _ = run([*args, "--help"], capsys)
    assert code == 0 and "Usage" in out


def test_console_scripts_help():
    for module in ("sim.cli", "device.cli", "cloud.cli"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "Usage" in proc.stdout, proc.stderr


def test_zoo_eval_on_micro_zoo(micro_home, tmp_path, capsys):
    report = tmp_path / "eval.md"
    code, out, err = run(
        ["zoo", "eval", "--recipe", "micro", "--home", str(micro_home), "--samples", "10",
         "--domain", "clear", "--domain", "night", "--report", str(report)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "teacher" in out and "device" in out and "night" in out
    text = report.read_text()
    assert "| teacher |" in text and "existence" in text
    assert "one standard error per domain cell" in text and "(10 samples)" in text


def test_zoo_eval_explicit_model_dir(micro_home, capsys):
    paths = ensure_zoo(micro_recipe(), home=micro_home, progress=False)
    code, out, err = run(["zoo", "eval", "--model", str(paths.device), "--samples", "8", "--domain", "fog"], capsys)
    assert code == 0, err
    assert "device" in out


def test_zoo_eval_keeps_two_models_of_the_same_name_apart(micro_home, tmp_path, capsys):
    paths = ensure_zoo(micro_recipe(), home=micro_home, progress=False)
    other = tmp_path / "copy" / "device"
    shutil.copytree(paths.device, other)
    argv = ["zoo", "eval", "--model", str(paths.device), "--model", str(other), "--samples", "8", "--domain", "fog"]
    code, out, err = run([*argv, "--json", str(tmp_path / "acc.json")], capsys)
    assert code == 0, err
    assert set(json.loads((tmp_path / "acc.json").read_text())) == {str(paths.device), str(other)}
    code, _, err = run(["zoo", "eval", "--model", str(other), "--model", str(other)], capsys)
    assert code == 1 and "given twice" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["zoo", "eval", "--model", "/nonexistent/model"], "model directory not found"),
        (["zoo", "eval", "--recipe", "micro", "--home", "{home}", "--domain", "sunset"], "unknown shift"),
        (["zoo", "eval", "--recipe", "micro", "--home", "{home}", "--domain", "fog:3"], "must be in [0, 1]"),
        (["zoo", "eval", "--recipe", "micro", "--home", "{home}", "--qtype", "colour"], "unknown question type"),
        (["zoo", "eval", "--recipe", "nope"], "unknown recipe"),
        (["zoo", "eval", "--recipe", "micro", "--home", "{empty}"], "not built yet"),
        (["world", "sample", "--domain", "night:x"], "must be a number"),
        (["zoo", "path", "--set", "bogus=1"], "needs FIELD=VALUE with a recipe field"),
        (["zoo", "path", "--set", "seed"], "needs FIELD=VALUE"),
        (["zoo", "build", "--set", 'vision_colour_rolls={{"night": 9}}'], "colour roll of 'night' must be in [1, 5]"),
        (["zoo", "path", "--set", 'vision_stage={{"steps": 0}}'], "vision_stage.steps"),
    ],
)
def test_bad_input_is_one_line(argv, needle, micro_home, tmp_path, capsys):
    argv = [a.format(home=micro_home, empty=tmp_path) for a in argv]
    code, _, err = run(argv, capsys)
    assert code != 0
    assert needle in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_corrupt_model_dir_is_one_line(tmp_path, capsys):
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "config.json").write_text("{")
    code, _, err = run(["zoo", "eval", "--model", str(bad)], capsys)
    assert code == 1 and "corrupt" in err and "Traceback" not in err


def test_world_sample_and_shifts(tmp_path, capsys):
    code, out, err = run(["world", "sample", "-n", "3", "--domain", "night", "--save", str(tmp_path / "s.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "s.png").stat().st_size > 0 and "night" in out
    code, out, err = run(["world", "shifts", "--save", str(tmp_path / "shifts.png")], capsys)
    assert code == 0 and (tmp_path / "shifts.png").exists()


def test_unknown_option_fails(capsys):
    code, _, err = run(["zoo", "eval", "--frobnicate"], capsys)
    assert code == 2 and "frobnicate" in err


def test_zoo_settings_name_their_own_cache(micro_home, capsys):
    base = ["zoo", "path", "--recipe", "micro", "--home", str(micro_home)]
    code, plain, _ = run(base, capsys)
    assert code == 0 and "(built)" in plain
    code, changed, err = run([*base, "--set", 'vision_colour_rolls={"night": 2}', "--set", "name=micro-rolled"], capsys)
    assert code == 0, err
    changed = changed.replace("\n", "")  # rich may wrap the long path
    assert "micro-rolled-" in changed and "(not built)" in changed
    rolled = micro_recipe().model_copy(update={"vision_colour_rolls": {"night": 2}, "name": "micro-rolled"})
    assert rolled.digest() in changed

"""The shipped reference zoo: found without building, compared bit for bit against a fresh build."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sim.cli import main
from sim.zoo import build, reference
from sim.zoo.recipe import RECIPES, ZooRecipe, micro_recipe


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, " ".join(out.out.split()), out.err  # rich wraps long lines


@pytest.fixture()
def shipped_micro(tmp_path, monkeypatch):
    """A micro zoo built into a cache and shipped into a temporary reference directory."""
    home = tmp_path / "cache"
    built = build.ensure_zoo(micro_recipe(), home=home, progress=False, use_shipped=False)
    monkeypatch.setattr(reference, "REFERENCE_DIR", tmp_path / "reference")
    shipped = reference.ship(built.root, "micro")
    return home, built, build.ZooPaths.at(shipped)


def test_ensure_zoo_returns_the_shipped_zoo_without_building(shipped_micro, tmp_path):
    _, _, shipped = shipped_micro
    empty_cache = tmp_path / "empty"
    paths = build.ensure_zoo(micro_recipe(), home=empty_cache, progress=False)
    assert paths == shipped
    assert not empty_cache.exists()  # nothing was built or locked there
    assert build.locate_zoo(micro_recipe(), empty_cache) == shipped
    # another recipe (another digest) is not served by the shipped zoo
    other = micro_recipe().model_copy(update={"seed": 5})
    assert build.shipped_zoo(other) is None and build.locate_zoo(other, empty_cache) is None


def test_compare_finds_identical_and_single_bit_changes(shipped_micro):
    _, built, shipped = shipped_micro
    same = reference.compare_zoos(built.root, shipped.root)
    assert [c.member for c in same] == ["teacher", "device"]
    assert all(c.equal and c.max_abs_diff == 0 for c in same)
    weights = shipped.device / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    flipped = tensors[name].clone().contiguous()
    flipped.view(-1).view(torch.int32)[0] ^= 1  # one bit of one float
    save_file({**tensors, name: flipped}, str(weights), metadata={"format": "pt"})
    after = {c.member: c for c in reference.compare_zoos(built.root, shipped.root)}
    assert after["teacher"].equal
    device = after["device"]
    assert not device.equal and device.identical == device.tensors - 1 and 0 < device.max_abs_diff < 1e-3


def test_compare_tells_negative_zero_from_zero(tmp_path):
    for name, value in (("a", 0.0), ("b", -0.0)):
        (tmp_path / name).mkdir()
        save_file({"w": torch.tensor([value, 1.0])}, str(tmp_path / name / "model.safetensors"))
    result = reference.compare_member("device", tmp_path / "a", tmp_path / "b")
    assert not result.equal and result.max_abs_diff == 0.0


def test_build_command_reports_bit_identity_with_the_shipped_zoo(shipped_micro, capsys):
    home, _, _ = shipped_micro
    code, out, err = run(["zoo", "build", "--recipe", "micro", "--home", str(home)], capsys)
    assert code == 0, err
    assert "equals the shipped zoo" in out and "bit for bit" in out


def test_build_command_reports_how_far_a_different_build_is(shipped_micro, capsys):
    home, _, shipped = shipped_micro
    weights = shipped.device / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * 1.5 for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    code, out, err = run(["zoo", "build", "--recipe", "micro", "--home", str(home), "--compare-samples", "8"], capsys)
    assert code == 0, err
    assert "differs" in out and "build minus shipped" in out and "device (shipped)" in out


def test_path_and_eval_use_the_shipped_zoo(shipped_micro, tmp_path, capsys):
    _, _, shipped = shipped_micro
    code, out, _ = run(["zoo", "path", "--recipe", "micro", "--home", str(tmp_path / "none")], capsys)
    assert code == 0 and "(shipped)" in out
    code, out, err = run(
        ["zoo", "eval", "--recipe", "micro", "--home", str(tmp_path / "none"), "--samples", "4", "--domain", "clear"],
        capsys,
    )
    assert code == 0, err
    assert "device" in out


def test_ship_records_figures_and_demo_reproduces_them(shipped_micro, capsys, tmp_path, monkeypatch):
    home, _, shipped = shipped_micro
    code, out, err = run(["zoo", "ship", "--recipe", "micro", "--home", str(home), "--samples", "6"], capsys)
    assert code == 0, err
    record = json.loads((shipped.root / reference.EVAL_FILE).read_text())
    assert record["digest"] == micro_recipe().digest() and record["samples"] == 6
    assert record["accuracy"]["device"]["clear"]["total"] == 6 and "transformers" in record["versions"]
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["zoo", "demo", "--recipe", "micro"], capsys)  # `tandem-sim demo` is the fleet demo now
    assert code == 0, err
    assert "shipped" in out and "reproduces the shipped figures exactly" in out


@pytest.mark.parametrize("name", ["base", "base576", "deep"])
def test_the_shipped_reference_zoo_is_the_current_recipes(name):
    """The zoo in the repository is the build of today's recipe (a changed recipe must be shipped again)."""
    recipe: ZooRecipe = RECIPES[name]()
    paths = build.shipped_zoo(recipe)
    manifest = json.loads((reference.reference_root(name) / build.MANIFEST).read_text())
    assert paths is not None, f"shipped {name} zoo has digest {manifest.get('digest')}, recipe {recipe.digest()}"
    members = ["teacher", "device"] if recipe.with_teacher else ["device"]
    for member in members:
        assert (paths.root / member / "model.safetensors").stat().st_size > 100_000
        assert (paths.root / member / "tokenizer.json").is_file()
    if name == "base":
        figures = reference.shipped_evaluation(name)
        assert figures is not None and figures["digest"] == recipe.digest() and figures["samples"] >= 300


def test_basis_command_builds_the_device_basis_deterministically(shipped_micro, capsys):
    from common.feature_basis import load_basis

    _, built, shipped = shipped_micro
    code, out, _ = run(["zoo", "basis", "--recipe", "micro", "--samples", "16"], capsys)
    assert code == 0 and "new" in out
    basis = load_basis(shipped.device)
    assert basis is not None and basis.version in out and basis.dim == basis.rank
    # the build in the cache has no basis, and the bit-for-bit weights comparison does not see the shipped one
    assert all(m.equal for m in reference.compare_zoos(built.root, shipped.root))
    code, out, _ = run(["zoo", "basis", "--recipe", "micro", "--samples", "16"], capsys)
    assert code == 0 and f"basis {basis.version}" in out and "identical to the one it replaces" in out

"""The layer table of the README, enforced: who may import whom (read from every module's imports,
function-level ones included)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `python -m ldm.X` commands: thin shells over the library; none imports another
COMMANDS = {"ldm.train_vae", "ldm.train_unet", "ldm.sample", "ldm.eval_text", "ldm.eval_vae", "ldm.convert",
            "ldm.toy", "ldm.eval_digits", "ldm.train_clip", "ldm.eval_clip",
            "ldm.train_prior", "ldm.teach_shape", "ldm.eval_image2image", "ldm.encoder_probe"}
# modules that may import no model: the data code, and the diffusion maths and samplers
NO_MODELS = {"ldm.diffusion", "ldm.samplers"}
MODELS = {"ldm.unet", "autoencoder"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from ldm import sample`
    return {m for m in found if m.split(".")[0] in ("ldm", "autoencoder", "kernels", "bench")}


def modules(package: str) -> list[tuple[str, set[str]]]:
    return [(module_name(p), imports_of(p)) for p in sorted((ROOT / package).rglob("*.py"))]


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_table_sees_every_command_and_module():
    names = {m for m, _ in modules("ldm")}
    assert COMMANDS <= names, COMMANDS - names
    for command in COMMANDS:  # each command runs as python -m
        assert "__main__" in (ROOT / (command.replace(".", "/") + ".py")).read_text()
    assert imports_of(ROOT / "ldm" / "sample.py") >= {"ldm.pipeline"}  # the reader finds what is there


@pytest.mark.parametrize("package, allowed", [
    ("kernels", ("kernels",)),
    ("autoencoder", ("autoencoder", "kernels")),
    ("ldm", ("ldm", "autoencoder", "kernels")),
])
def test_each_package_imports_only_the_layers_below_it(package, allowed):
    for name, deps in modules(package):
        bad = sorted(d for d in deps if not under(d, allowed))
        assert not bad, f"{name} imports {bad}; {package} may import only {allowed}"


def test_no_command_imports_another_and_the_library_imports_no_command():
    for name, deps in modules("ldm"):
        commands = sorted(d for d in deps if under(d, COMMANDS) and d != name)
        assert not commands, f"{name} imports the command module(s) {commands}; import the library layer instead"


def test_data_and_diffusion_maths_import_no_model():
    for name, deps in modules("ldm"):
        if under(name, ("ldm.data",)) or name in NO_MODELS:
            bad = sorted(d for d in deps if under(d, MODELS) or under(d, ("kernels",)))
            assert not bad, f"{name} imports the model code {bad}"
        if under(name, ("ldm.data",)):
            assert all(under(d, ("ldm.data",)) for d in deps), f"{name} imports {deps}"


def test_readme_layer_table_names_every_module():
    """The README's table lists each library module and each command of ldm/."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Library and commands"):]
    table = table[:table.index("\n#")]
    for name, _ in modules("ldm"):
        if name in ("ldm", "ldm.data.folder", "ldm.data.shapes"):
            continue
        assert re.search(rf"`{re.escape(name)}`", table), f"{name} is missing from the README's layer table"


def test_no_file_in_ldm_over_500_lines_unless_it_says_why():
    for path in sorted((ROOT / "ldm").rglob("*.py")):
        lines = path.read_text().count("\n")
        if lines > 500:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "one cohesive algorithm" in doc, f"{path.relative_to(ROOT)} has {lines} lines"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

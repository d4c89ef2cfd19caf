"""The import layering, read from the source with ``ast`` (function-local imports count too): the model layer and the
chat backends never import the data layer, the maths (losses, metrics) never import Lightning or the layers above it,
and benchmarks use dynlab's public names only. Also pins the tiny tokenizer, whose training text moved below both."""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("dynlab.data", "dynlab.modules", "dynlab.evaluation", "dynlab.tracking", "dynlab.dynamics", "dynlab.cli",
         "dynlab.sweep", "dynlab.slurm")
LIGHTNING = ("lightning", "pytorch_lightning")


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``path``; ``from a import b`` gives ``a.b`` (b may be a module)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):  # relative: dynlab uses absolute imports only, so flag it
            yield node.lineno, "." * node.level + (node.module or "")


def offending(paths: list[Path], banned: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line}: {module}" for p in paths for line, module in imports(p)
            if module.startswith(".") or any(module == b or module.startswith(b + ".") for b in banned)]


def test_the_scan_sees_function_local_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from dynlab.data.formats import load_rows\n    import lightning\n")
    assert [m for _, m in imports(source)] == ["os", "dynlab.data.formats.load_rows", "lightning"]


@pytest.mark.parametrize("files", ["dynlab/models", "dynlab/chat.py"])
def test_models_and_chat_import_no_layer_above_them(files: str) -> None:
    paths = sorted((ROOT / files).rglob("*.py")) if (ROOT / files).is_dir() else [ROOT / files]
    assert paths and offending(paths, UPPER) == []


def test_corpus_and_errors_import_nothing_from_dynlab() -> None:
    assert offending([ROOT / "dynlab/corpus.py", ROOT / "dynlab/errors.py"], ("dynlab",)) == []


@pytest.mark.parametrize("package", ["dynlab/losses", "dynlab/metrics"])
def test_losses_and_metrics_import_no_lightning_and_no_layer_above(package: str) -> None:
    paths = sorted((ROOT / package).rglob("*.py"))
    assert paths and offending(paths, (*LIGHTNING, *UPPER, "dynlab.models", "dynlab.chat")) == []


def _private_uses(path: Path) -> Iterator[str]:
    """Underscore names of dynlab a file uses: imported, read as an attribute of an imported dynlab name, patched
    by name (``mock.patch.object(module, "_x")``) or by dotted path (``"dynlab.m._x"``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bound: set[str] = set()  # local names bound to dynlab modules, classes or functions

    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dynlab"):
            for alias in node.names:
                if private(alias.name) or any(private(part) for part in node.module.split(".")):
                    yield f"{path.name}:{node.lineno}: from {node.module} import {alias.name}"
                bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dynlab"):
                    if any(private(part) for part in alias.name.split(".")):
                        yield f"{path.name}:{node.lineno}: import {alias.name}"
                    bound.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name) \
                and node.value.id in bound:
            yield f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}"
        elif isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) \
                and node.args[0].id in bound and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and private(node.args[1].value):
            yield f"{path.name}:{node.lineno}: {node.args[0].id}, {node.args[1].value!r}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and re.fullmatch(r"dynlab(\.\w+)+", node.value) and any(map(private, node.value.split("."))):
            yield f"{path.name}:{node.lineno}: {node.value!r}"


def test_the_private_name_scan_finds_each_kind_of_use(tmp_path: Path) -> None:
    source = tmp_path / "bench.py"
    source.write_text("from dynlab.models import forward\nfrom dynlab.models.load import _resolve_dir\n"
                      "import dynlab.models.forward as fw\nfrom unittest import mock\n\n"
                      "forward._rows_one_by_one\nfw._x\nmock.patch.object(forward, '_y')\nmock.patch('dynlab.a._z')\n"
                      "forward.shared_prompt_hidden_rows\nforward.__name__\n")
    assert len(list(_private_uses(source))) == 5


def test_benchmarks_use_public_dynlab_names_only() -> None:
    paths = sorted((ROOT / "benchmarks").glob("*.py"))
    assert paths and [use for p in paths for use in _private_uses(p)] == []


def test_the_tiny_tokenizer_and_its_corpus_are_unchanged_by_the_move() -> None:
    from dynlab.corpus import corpus
    from dynlab.data import synthetic
    from dynlab.models.load import tiny_tokenizer

    assert synthetic.corpus is corpus  # still importable from the data layer
    texts = corpus(0)
    assert (len(texts), hashlib.sha256(json.dumps(texts).encode()).hexdigest()) == (
        972, "2f65e1d57559d2c88394789d8652f472b6d20d2ae550f5f2b1fd86e74c3f4d0c")
    tok = tiny_tokenizer()
    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
    assert vocab == "6cd798ec08701a7febeb85b1bcf011b0ab686567bbc60cf513415c363e9b5f69"
    assert tok("Hello there, the capital of France is Paris.")["input_ids"] == [
        41, 397, 80, 267, 270, 13, 267, 335, 273, 222, 39, 83, 259, 68, 70, 284, 362, 307, 265, 15]

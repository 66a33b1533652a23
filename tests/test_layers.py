"""The layering contract: imports go one way (cli, flows, orchestration, tasks, studies, evaluation, judges,
ml, core) and never in a circle; it fails, naming the import, when one is added."""

import shutil

from rlhf.orchestration import imports
from tests.conftest import ROOT


def test_no_module_imports_upward_or_in_a_circle():
    g = imports.graph(ROOT)
    assert imports.upward_imports(g) == []
    assert imports.cycles(g) == []


def test_every_module_belongs_to_a_layer():
    outside = [m for m in imports.modules(ROOT) if imports.layer_of(m) == len(imports.LAYERS)]
    assert outside == []


def test_the_contract_names_an_upward_import_and_the_cycle_it_makes(tmp_path):
    for package in imports.PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    paths = tmp_path / "rlhf" / "core" / "paths.py"
    paths.write_text(paths.read_text() + "\n\ndef _late():\n    from rlhf.evaluation.report import metrics_rows\n")
    g = imports.graph(tmp_path)
    assert imports.upward_imports(g) == [
        "rlhf.core.paths imports rlhf.evaluation.report (rlhf.evaluation is above rlhf.core)"
    ]
    assert imports.cycles(g) == [["rlhf.core.paths", "rlhf.evaluation.report"]]


def test_relative_and_package_imports_resolve_to_modules(tmp_path):
    (tmp_path / "rlhf" / "ml").mkdir(parents=True)
    (tmp_path / "rlhf" / "__init__.py").write_text('"""docstring only"""\n')
    (tmp_path / "rlhf" / "ml" / "__init__.py").write_text("from . import models\n")
    (tmp_path / "rlhf" / "ml" / "models.py").write_text("from ..ml import sampling\nimport rlhf.ml.pairs\n")
    (tmp_path / "rlhf" / "ml" / "sampling.py").write_text("")
    (tmp_path / "rlhf" / "ml" / "pairs.py").write_text("")
    g = imports.graph(tmp_path)
    assert g["rlhf.ml"] == {"rlhf.ml.models"}
    assert g["rlhf.ml.models"] == {"rlhf.ml.sampling", "rlhf.ml.pairs"}
    # importing sampling runs rlhf/ml/__init__.py (code) and so models and pairs; rlhf/__init__.py runs nothing
    assert imports.files_imported("rlhf.ml.sampling", tmp_path) == [
        "rlhf/ml/__init__.py",
        "rlhf/ml/models.py",
        "rlhf/ml/pairs.py",
        "rlhf/ml/sampling.py",
    ]

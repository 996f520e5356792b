"""An editable install (``pip install -e .``, README "Develop") serves the working tree: the package, and the
top-level ``properties/`` and ``dataset_prep/`` folders mapped into it (setup.cfg ``package_dir``), so an edit or a
new file takes effect in the next process without reinstalling. Run by ``scripts/test.sh`` in its own editable
virtualenv (``-m editable``); the main run tests the installed wheel instead."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.editable


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_package_and_mapped_folders_come_from_the_working_tree():
    files = _python("import recbole_llmfuse, recbole_llmfuse.properties as p, recbole_llmfuse.dataset_prep as d; "
                    "print(recbole_llmfuse.__file__); print(p.__file__); print(d.__file__)").splitlines()
    assert files == [os.path.join(REPO, "recbole_llmfuse", "__init__.py"), os.path.join(REPO, "properties", "__init__.py"),
                     os.path.join(REPO, "dataset_prep", "__init__.py")]


@pytest.mark.parametrize("folder, package", [("recbole_llmfuse/model", "recbole_llmfuse.model"),
                                             ("dataset_prep", "recbole_llmfuse.dataset_prep")])
def test_an_edit_takes_effect_without_reinstalling(folder, package):
    """A new module in the tree (as a researcher adds a model file) imports at once; its next edit is seen by the
    next process; a model YAML beside the models is found by the registry."""
    name = f"_editable_probe_{uuid.uuid4().hex[:8]}"
    path = os.path.join(REPO, folder, f"{name}.py")
    try:
        with open(path, "w") as f:
            f.write("VALUE = 1\n")
        assert _python(f"import {package}.{name} as m; print(m.VALUE)") == "1"
        with open(path, "w") as f:
            f.write("VALUE = 2\n")
        assert _python(f"import {package}.{name} as m; print(m.VALUE)") == "2"
    finally:
        os.remove(path)
    yaml_file = _python("from recbole_llmfuse import registry; print(registry.model_config_file(registry.get_model('PAD')))")
    assert yaml_file == os.path.join(REPO, "properties", "model", "PAD.yaml")

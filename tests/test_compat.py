"""The compatibility shims: each fixes its breakage and leaves everything else alone."""
from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import recbole_llmfuse  # noqa: F401
from recbole_llmfuse import Config, create_dataset


def test_numpy_aliases_for_recbole_and_ray():
    for name in ("float_", "complex_", "unicode_", "bool8", "float", "long"):
        assert hasattr(np, name)


def test_autograd_anomaly_mode_is_off_after_recbole_import():
    import recbole.model.sequential_recommender  # noqa: F401  (imports sine.py, which turns it on)

    assert not torch.is_anomaly_enabled()


class _NotAWeight:
    pass


def test_trusted_load_only_inside_recbole(tmp_path):
    """RecBole's trainer loads its full-pickle checkpoints; torch.load's safe default is unchanged."""
    from recbole.trainer import trainer as trainer_module

    path = tmp_path / "ckpt.pth"
    torch.save({"config": _NotAWeight(), "state_dict": {}}, path)
    assert isinstance(trainer_module.torch.load(path)["config"], _NotAWeight)
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path)


def test_blank_token_seq_cell_loads(small_data_path, tmp_path):
    """A blank token_seq cell becomes an empty sequence (pandas 3 crashes here: hence the pandas<3 pin)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(f"{small_data_path}/ml-small", root / "blank")
    for suffix in ("inter", "item"):
        (root / "blank" / f"ml-small.{suffix}").rename(root / "blank" / f"blank.{suffix}")
    item_file = root / "blank" / "blank.item"
    lines = item_file.read_text().splitlines()
    cols = lines[1].split("\t")
    cols[1] = ""  # blank movie_title:token_seq
    lines[1] = "\t".join(cols)
    item_file.write_text("\n".join(lines) + "\n")
    config = Config(
        "FastSASRec", "blank",
        config_dict={"data_path": str(root), "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                                                          "item": ["item_id", "movie_title"]}},
        argv=[],
    )
    dataset = create_dataset(config)
    iid = dataset.token2id(dataset.iid_field, cols[0])
    titles = dataset.item_feat["movie_title"]
    assert len(titles[iid]) == 0 or int((titles[iid] != 0).sum()) == 0


FREED_BLOCK_SCRIPT = """
import torch
import recbole_llmfuse  # noqa: F401
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
w = torch.nn.Parameter(torch.zeros(1))
opt = torch.optim.SGD([w], lr=0.1)
x = torch.ones(3_000_000); del x   # 12 MB, mmapped; freeing it raises glibc's dynamic mmap threshold
base = rss()
for n in range(25):   # one trim period of optimizer steps
    y = torch.ones(2_500_000 + 1000 * n); del y   # ~10 MB blocks of varying size: now from the heap
    w.grad = torch.ones(1); opt.step()
print(rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_heap_memory_goes_back_to_the_system_every_few_steps():
    """With the shim, free heap fragments leave the process every TRIM_EVERY optimizer steps."""
    from recbole_llmfuse.compat import TRIM_EVERY

    assert TRIM_EVERY == 25

    def growth(flag):
        env = dict(os.environ, RECBOLE_LLMFUSE_MALLOC_TUNING=flag)
        out = subprocess.run([sys.executable, "-c", FREED_BLOCK_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=300)
        return float(out.stdout.strip().splitlines()[-1])

    assert growth("1") < 2.0  # MB
    assert growth("0") > 5.0  # glibc's own behaviour: the heap keeps the freed blocks


LEAN_RUN_SCRIPT = """
import sys
sys.modules['ray'] = None  # as where Ray is not installed: any `import ray` raises ImportError
import recbole_llmfuse
import recbole.quick_start  # as a RecBole user's script does: `from ray import tune` there is deferred
heavy = lambda: sorted({m.split('.')[0] for m, v in sys.modules.items() if v is not None} & {'ray', 'sklearn', 'transformers', 'matplotlib'})
after_import = heavy()
recbole_llmfuse.run_recbole('FastSASRec', 'ml-small', config_dict={
    'data_path': sys.argv[1], 'load_col': {'inter': ['user_id', 'item_id', 'timestamp']}, 'epochs': 1,
    'MAX_ITEM_LIST_LENGTH': 5, 'hidden_size': 16, 'train_batch_size': 2048, 'show_progress': False,
    'state': 'WARNING'}, argv=[])
print(after_import, heavy())
"""


def test_import_and_a_training_run_load_no_ray_and_no_sklearn(small_data_path):
    """Ray (Tune sweeps, Ray prep), scikit-learn (RecBole's AUC/MAE/RMSE), transformers and matplotlib are
    imported where they are used, not by ``import recbole_llmfuse`` or a plain training run; both work where
    Ray is not installed."""
    out = subprocess.run([sys.executable, "-c", LEAN_RUN_SCRIPT, small_data_path], capture_output=True, text=True,
                         timeout=300, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[] []"


def test_deferred_recbole_imports_resolve_on_first_use():
    """The names RecBole binds from Ray and scikit-learn at import still work when used."""
    import recbole.evaluator.metrics as metrics
    import recbole.quick_start.quick_start as recbole_quick_start

    assert metrics.sk_auc(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == 0.5
    assert metrics.mean_squared_error([1.0, 2.0], [1.0, 4.0]) == 2.0
    import ray.tune

    assert recbole_quick_start.tune.report is ray.tune.report


def test_import_hooks_defer_names_patch_modules_and_step_aside(tmp_path, monkeypatch):
    """The mechanism behind the shims, on modules of the test's own: a hooked module's `from pkg import name` binds a
    stand-in that imports on first use (a submodule or an attribute; a missing dependency still fails there), its
    patches run right after it loads, modules imported before the shims are patched by `_patch_imported`, and a
    hooked name that does not exist is left to the normal import error."""
    from recbole_llmfuse import compat

    (tmp_path / "probe_heavy").mkdir()
    (tmp_path / "probe_heavy" / "__init__.py").write_text("ANSWER = 42\n")
    (tmp_path / "probe_heavy" / "sub.py").write_text("def f():\n    return 7\n")
    (tmp_path / "probe_heavy" / "broken.py").write_text("import probe_not_installed\n")
    (tmp_path / "probe_user.py").write_text("from probe_heavy import sub, ANSWER, broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(compat.DEFERRED_IMPORTS, "probe_user", ("probe_heavy",))
    seen = []
    monkeypatch.setitem(compat.PATCHES, "probe_user", [lambda module: seen.append(module.__name__)])
    monkeypatch.setitem(compat.PATCHES, "probe_absent", [])
    try:
        import probe_user

        assert seen == ["probe_user"] and "probe_heavy" not in sys.modules
        assert repr(probe_user.sub) == "<deferred probe_heavy.sub>"
        assert probe_user.sub.f() == 7 and "probe_heavy" in sys.modules  # a submodule, on first use
        assert probe_user.ANSWER.real == 42  # an attribute of the package
        with pytest.raises(ModuleNotFoundError, match="probe_not_installed"):
            probe_user.broken.anything
        compat._patch_imported()  # imported before the shims: patched when they are applied
        assert seen == ["probe_user", "probe_user"]
        with pytest.raises(ModuleNotFoundError, match="probe_absent"):
            import probe_absent  # noqa: F401
    finally:
        for name in ("probe_user", "probe_heavy", "probe_heavy.sub", "probe_heavy.broken"):
            sys.modules.pop(name, None)


def test_ray_2_6_sees_packaging_through_pkg_resources(monkeypatch):
    """ray 2.6.3 (a plain pip install's) reads `pkg_resources.packaging` and the vendored `packaging.version`, gone
    from setuptools >= 71: the shim points both at the installed `packaging` (a current Ray needs nothing)."""
    from importlib import metadata

    import packaging

    from recbole_llmfuse import compat

    pkg_resources = pytest.importorskip("pkg_resources")
    monkeypatch.setattr(metadata, "version", lambda name: "2.6.3" if name == "ray" else metadata.version(name))
    monkeypatch.delattr(pkg_resources, "packaging", raising=False)
    for name in ("pkg_resources._vendor.packaging", "pkg_resources._vendor.packaging.version"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    compat._pkg_resources_packaging()
    assert pkg_resources.packaging is packaging
    assert importlib.import_module("pkg_resources._vendor.packaging.version").Version("2.6.3") < packaging.version.Version("2.10")


def test_graph_model_shims_on_recboles_lightgcn():
    """LightGCN's module sees a `dok_matrix` with `_update` (removed in scipy 1.13) and a `torch.sparse.FloatTensor`
    that builds a COO tensor without the deprecation warning."""
    import warnings

    import recbole.model.general_recommender.lightgcn as lightgcn

    m = lightgcn.sp.dok_matrix((2, 3), dtype=np.float32)
    m._update({(0, 1): 1.0, (1, 2): 2.0})
    assert m.toarray().tolist() == [[0, 1, 0], [0, 0, 2]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = lightgcn.torch.sparse.FloatTensor(torch.tensor([[0, 1], [1, 2]]), torch.tensor([1.0, 2.0]), torch.Size([2, 3]))
    assert t.is_sparse and t.to_dense().tolist() == [[0, 1, 0], [0, 0, 2]]

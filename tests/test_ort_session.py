"""evaluate.ort_session builds (through onnx_read.skeleton_beside) ONNX Runtime sessions from a temporary skeleton whose initializers point into the
graph file (each weight read once): same logits as a session on the file itself, no file left behind, and the
plain path where no skeleton can be written."""

import os

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    from conftest import make_tiny
    from sq_export.export.exporter import export_onnx

    model, fam = make_tiny("llama")
    d = tmp_path_factory.mktemp("g")
    export_onnx(model, fam, d / "m.onnx")
    return d / "m.onnx"


def _logits(sess):
    ids = np.array([[1, 5, 9, 2, 7, 3]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return sess.run(["logits"], {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}})[0]


def test_skeleton_session_is_bit_identical_and_leaves_nothing(graph):
    from sq_export.measure.perplexity import ort_session
    from sq_export.onnxio.read import skeleton_beside

    before = sorted(os.listdir(graph.parent))
    with skeleton_beside(str(graph), ".ort.onnx") as skel:
        assert skel is not None and os.path.dirname(skel) == str(graph.parent.resolve()) and os.path.basename(skel).startswith(".")
        assert os.path.getsize(skel) < os.path.getsize(graph) / 4  # the weights stay in the graph file
    plain = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(_logits(ort_session(str(graph))), _logits(plain))
    assert sorted(os.listdir(graph.parent)) == before


def test_unwritable_folder_falls_back_to_the_file(graph, monkeypatch):
    """Where no skeleton can be written (a read-only folder: mkstemp raises), the session is built from the file."""
    import tempfile

    from sq_export.measure.perplexity import ort_session
    from sq_export.onnxio.read import skeleton_beside

    def refuse(*a, **k):
        raise PermissionError(13, "read-only folder")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with skeleton_beside(str(graph), ".ort.onnx") as skel:
        assert skel is None
    plain = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(_logits(ort_session(str(graph))), _logits(plain))

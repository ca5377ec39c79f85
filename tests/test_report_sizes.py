"""The report's size line counts what was written: a graph with its external data, an engine or its segment engines.
Sizes are those of the 2026-11-30 device run (`run --stream --segments 2` of a 4-layer Llama-2-7B-wide checkpoint,
lab/2026-11-29/logs7/device/run/manifest.json): its report had compared model.sq.onnx's 184 kB header file with the
2.14 GB of model.fp.onnx (0.00×)."""

from sq_export.report import artifact_bytes

SIZES = {  # file name: bytes, as the run's manifest recorded them
    "model.fp.onnx": 2143558981, "model.fp.seg00.onnx": 67975, "model.fp.seg01.onnx": 69410,
    "model.sq.onnx": 183965, "model.sq.onnx.data": 2668744704, "model.sq.seg00.onnx": 93099, "model.sq.seg01.onnx": 94426,
    "model.fp.engines.seg00.engine": 1335402500, "model.fp.engines.seg00.engine.json": 8238,
    "model.fp.engines.seg01.engine": 1073466956, "model.fp.engines.segments.json": 988,
    "model.sq.engines.seg00.engine": 931087012, "model.sq.engines.seg01.engine": 668855700,
    "model.sq.engines.seg01.engine.json": 7438,
}


def test_a_graph_counts_its_external_data_and_engines_their_segments():
    assert artifact_bytes(SIZES, "model.sq.onnx") == 183965 + 2668744704
    assert artifact_bytes(SIZES, "model.fp.onnx") == 2143558981  # weights inline: no .data, no segment graphs counted
    assert artifact_bytes(SIZES, "model.sq.engine") == 931087012 + 668855700  # the segments, not their .json
    assert artifact_bytes(SIZES, "model.fp.engine") == 1335402500 + 1073466956
    assert artifact_bytes({"model.sq.engine": 7}, "model.sq.engine") == 7
    assert artifact_bytes(SIZES, "model.naive.onnx") is None

"""Shared helpers for the graph-pass tests (torch-free)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GRAPHS = FIXTURES / "graphs"


def load(name: str) -> onnx.ModelProto:
    return onnx.load(GRAPHS / f"{name}.onnx")


def make_graphs_module():
    spec = importlib.util.spec_from_file_location("make_graphs", FIXTURES / "make_graphs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def feeds(seed: int = 0, batch: int = 2, seq: int = 9) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[0, -2:] = 0
    return {"input_ids": rng.integers(0, 32, (batch, seq), dtype=np.int64), "attention_mask": mask}


def run(model: onnx.ModelProto, f: dict, optimize: bool = False) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(["logits"], f)[0]


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)

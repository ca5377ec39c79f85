"""Layer-streamed processing for models larger than the GPU (or host) memory, as llm-compressor's sequential
pipeline and AutoAWQ do: the model is a skeleton without weights; its decoder layers are loaded one at a time from
the checkpoint's safetensors, run on the cached calibration activations, measured, smoothed, quantized, written and
freed. Peak memory ≈ one decoder layer + the cached activations + the embedding part, whatever the depth.

    from sq_export.stream import calibrate_streamed, quantize_streamed
    calib = calibrate_streamed(folder, ids, CalibOptions(samples=512, seq_len=512), rows=512)   # = calibrate_ids
    res = quantize_streamed(folder, "out/", ids, recipe)       # smoothed checkpoint + static scales, layer by layer

The Python API wraps both with texts and tokenizers (sq_export.api.calibrate_streamed, quantize_streamed) and
reads a streamed result back as a QuantizedModel for export (sq_export.api.load_quantized).

- checkpoint.py: a folder's safetensors, one tensor at a time
- layers.py: the skeleton, the captured layer inputs, load / forward / free a layer
- calibrate.py: the streamed calibration (bit-identical to the whole-model pass on the CPU in float32)
- quantize.py: the streamed smoothing + static scales + fallback N, writing the smoothed checkpoint shard by shard
- writer.py: the shard writer
- weight_stats.py: per-input-channel max|W| of every quantized Linear, one layer at a time (run --stream's report)
- lazy.py: export without the weights in memory (placeholders; each weight read from the checkpoint when written)
- perplexity.py: the streamed perplexity of a float or quantize_streamed folder (bit-identical on the CPU in float32)
"""

from __future__ import annotations

__all__ = ["calibrate_streamed", "quantize_streamed", "check_streamable", "QUANT_FILE"]


def __getattr__(name):
    if name == "calibrate_streamed":
        from sq_export.stream.calibrate import calibrate_streamed

        return calibrate_streamed
    if name in ("quantize_streamed", "check_streamable", "QUANT_FILE", "recipe_from_json"):
        from sq_export.stream import quantize

        return getattr(quantize, name)
    raise AttributeError(f"module 'sq_export.stream' has no attribute {name!r}")

"""Layer-streamed perplexity: `measure.perplexity.torch_perplexity` for a model folder too large to load, one
decoder layer in memory at a time.

The evaluation chunks (chunk_tokens: the same chunking on every backend) are captured as one batch each; every
decoder layer is loaded, run on all chunks and freed, as calibration streams; then the model's own forward turns
each chunk's final hidden states into logits (final norm, LM head and any logit transform are its code:
LayerStream.logits). For a `quantize_streamed` folder (sq_quant.json) each layer's Linears are swapped for the
recorded static QLinears before it runs — the fake-quantized model `load_quantized` builds, layer by layer. On the
CPU in float32 the result is the whole-model perplexity bit for bit (tests/test_stream_perplexity.py). Memory: one
layer's weights + the chunks' hidden states (max_tokens × hidden in the model's type: 4096 tokens of a 4096-wide
model in float16, 32 MB) + the embedding part and the head.
"""

from __future__ import annotations

from pathlib import Path

from sq_export import progress


def perplexity_streamed(folder: str | Path, ids, seq_len: int = 512, max_tokens: int | None = None, *, device=None,
                        dtype: str = "auto") -> dict:
    """{"perplexity", "tokens", "quantized"} of the model in `folder` on token ids `ids`, chunked as
    torch_perplexity; a quantize_streamed folder is evaluated as its fake-quantized model."""
    import torch

    from sq_export.measure.perplexity import PerplexityAccumulator, chunk_tokens
    from sq_export.stream.calibrate import layer_linears, open_stream
    from sq_export.stream.quantize import quantize_as_recorded, read_quant_record

    rec = read_quant_record(folder)  # a quantize_streamed folder: its layers run as static QLinears
    chunks = [c[None] for c in chunk_tokens(ids, seq_len, max_tokens)]
    ls = open_stream(folder, device, dtype)
    try:
        ls.capture(chunks)
        for i in progress.bar(range(ls.num_layers), desc="perplexity (streamed)", unit="layer"):
            layer = ls.load(i)
            if rec:  # swapped inside the loaded layer (the same module object)
                quantize_as_recorded(ls.model, rec, layer_linears(ls.family, i))
            outs = ls.forward(i, layer)
            ls.free(i)
            ls.advance(outs)
        ls.load_head()
        acc = PerplexityAccumulator()
        with torch.no_grad():
            for b, c in enumerate(chunks):
                acc.add(ls.logits(b, c)[0].float().cpu().numpy(), c[0])
    finally:
        ls.close()
    return {"perplexity": acc.perplexity, "tokens": acc.tokens, "quantized": rec is not None}

"""ppl.chunk_nll in row blocks gives the bits of the all-rows-at-once computation it replaced."""


def test_blocked_chunk_nll_is_bit_identical_to_all_rows_at_once():
    import numpy as np

    from sq_export.measure.perplexity import chunk_nll

    def at_once(logits, ids):
        lg = np.asarray(logits[:-1], dtype=np.float64)
        tgt = np.asarray(ids[1:], dtype=np.int64)
        m = lg.max(axis=-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(lg - m).sum(axis=-1))
        return float((lse - lg[np.arange(len(tgt)), tgt]).sum()), int(len(tgt))

    rng = np.random.default_rng(0)
    for L in (2, 3, 64, 65, 129, 300):
        for dt in (np.float32, np.float16):
            lg = (rng.standard_normal((L, 500)) * 5).astype(dt)
            ids = rng.integers(0, 500, L)
            assert chunk_nll(lg, ids) == at_once(lg, ids)

"""Issue 17: the token view (sq_export.measure.outliers, `sq-export diagnose --tokens`) finds massive activations."""

import json

import numpy as np
import torch

from conftest import make_tiny, token_batches
from sq_export.measure import outliers

MASSIVE_ID = 77


def _massive(token=MASSIVE_ID, gain=1000.0):
    """Tiny Llama whose embedding row of one token id is ×gain: that token carries a massive activation in the
    residual stream wherever it appears."""
    model, fam = make_tiny("llama", outliers=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] *= gain
    return model, fam


def _windows():
    w = token_batches(4, 32, seed=3)
    w[w == MASSIVE_ID] = MASSIVE_ID + 1
    w[1, 5] = MASSIVE_ID
    w[3, 17] = MASSIVE_ID
    return w


def test_token_stats_find_the_injected_token_in_every_layer():
    model, fam = _massive()
    st = outliers.token_stats(model, fam, _windows(), desc=None)
    n_linear = len(fam.quantized_linears())
    assert st.tmax.shape == (n_linear + fam.num_layers(), 4, 32)
    rep = outliers.report(st, None, top=2)
    for row in rep["layers"]:
        top = row["residual"]["top"]
        assert {(t["window"], t["position"]) for t in top} == {(1, 5), (3, 17)}, row
        assert all(t["id"] == MASSIVE_ID and t["ratio"] > 100 for t in top)
    # the position-0 share counts only the real positions; the frequent ids name the token
    assert rep["position_0"]["residual"]["at_position_0"] == 0
    assert rep["position_0"]["residual"]["outlier_tokens"] == 2 * fam.num_layers()
    ids = outliers.frequent_outlier_ids(st, outliers.RESIDUAL, 64.0)
    assert ids[0] == (MASSIVE_ID, 2 * fam.num_layers())
    assert "p17" in outliers.format_table(rep)


def test_token_stats_do_not_change_the_model_and_match_a_plain_forward():
    model, fam = _massive()
    w = _windows()
    st = outliers.token_stats(model, fam, w, batch_size=3, desc=None)  # a partial last batch
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    with torch.no_grad():
        h = model.model(input_ids=torch.as_tensor(w), output_hidden_states=True).hidden_states
    last = fam.num_layers() - 1
    # hidden_states[i + 1] is layer i's output, except the last, which HF gives after the final norm
    ref = h[1].abs().amax(-1).numpy()
    j = st.site_index(0, outliers.RESIDUAL)
    np.testing.assert_allclose(st.tmax[j], ref, rtol=1e-6)
    assert st.site_index(last, "mlp.down_proj") is not None


def test_position_zero_massive_activation_is_reported_as_position_zero():
    model, fam = make_tiny("llama", outliers=False)
    w = token_batches(3, 16, seed=4)
    with torch.no_grad():  # every window's first token massive, whatever its id: an attention sink's signature
        emb = model.get_input_embeddings().weight
        for t in set(w[:, 0].tolist()):
            emb[t] *= 1000.0
        w[:, 1:][np.isin(w[:, 1:], w[:, 0])] = 3
    st = outliers.token_stats(model, fam, w, desc=None)
    rep = outliers.report(st, None)
    share = rep["position_0"]["residual"]
    assert share["share_position_0"] == 1.0 and share["outlier_tokens"] == 3 * fam.num_layers()
    assert all(r["residual"]["windows_top_at_0"] == 3 for r in rep["layers"])
    assert outliers.frequent_outlier_ids(st, outliers.RESIDUAL) == []  # position 0 is not counted


def test_plot_writes_a_png(tmp_path):
    model, fam = _massive()
    st = outliers.token_stats(model, fam, _windows(), desc=None)
    outliers.plot(tmp_path / "t.png", st)
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_diagnose_tokens_cli(tiny_dirs, small_text, tmp_path, capsys):
    from sq_export.cli import main

    code = main(["-q", "diagnose", str(tiny_dirs("llama")), "--tokens", "--calib-text", str(small_text / "calib.txt"),
                 "--calib-seq-len", "32", "--windows", "2", "-o", str(tmp_path / "d"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert r["windows"] == 2 and r["seq_len"] == 32 and len(r["layers"]) == 2
    assert (tmp_path / "d" / "tokens.png").is_file() and json.loads((tmp_path / "d" / "tokens.json").read_text())["layers"]
    top = r["layers"][0]["residual"]["top"][0]
    assert set(top) >= {"position", "id", "text", "max", "ratio"}


def test_diagnose_tokens_after_a_prefix_and_refusals(tiny_dirs, small_text, tmp_path, capsys):
    from sq_export.cli import main

    d = str(tiny_dirs("llama"))
    text = ["--calib-text", str(small_text / "calib.txt"), "--calib-seq-len", "32"]
    code = main(["-q", "diagnose", d, "--tokens", *text, "--windows", "2", "--prefix-outliers", "ids:1,5", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert r["prefix_outliers"]["tokens"] == [1, 5] and r["windows"] == 2
    # not yet supported: the SQNR view with a prefix says so (exit 2) instead of ignoring it
    assert main(["-q", "diagnose", d, *text, "--samples", "2", "--windows", "1", "--prefix-outliers", "auto"]) == 2

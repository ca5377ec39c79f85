"""CLI round trips on tiny model folders of every family: calibrate → smooth → eval, export → eval(onnx)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import FAMILIES
from sq_export.cli import main

CAL = ["--samples", "4", "--calib-seq-len", "32"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_calibrate_smooth_eval_round_trip(family, tiny_dirs, small_text, tmp_path, capsys):
    d = tiny_dirs(family)
    calib = small_text / "calib.txt"
    code, out, err = run_cli(capsys, "-q", "calibrate", d, "--calib-text", calib, *CAL, "-o", tmp_path / "cal", "--json")
    assert code == 0, err
    scales = tmp_path / "cal" / "act_scales.safetensors"
    assert scales.is_file()

    code, out, err = run_cli(capsys, "-q", "smooth", d, "--act-scales", scales, "--calib-text", calib, *CAL, "-o", tmp_path / "sm", "--json")
    assert code == 0, err
    assert last_json(out)["max_abs_logit_change"] < 1e-3

    # the smoothed folder reloads and computes the same float function as the original
    from sq_export.modeling import load_model

    orig, _, _ = load_model(str(d), with_tokenizer=False)
    sm, _, _ = load_model(str(tmp_path / "sm"), with_tokenizer=False)
    x = torch.randint(4, 200, (2, 24))
    with torch.no_grad():
        a = orig(input_ids=x).logits
        b = sm(input_ids=x).logits
    assert (a - b).abs().max() < 1e-4 * a.abs().max() + 1e-5
    from sq_export.families import family_for

    key = family_for(orig).groups()[0].source + ".weight"
    assert not torch.equal(orig.state_dict()[key], sm.state_dict()[key])  # the factors really were folded

    res = {}
    for mode in ("fp", "naive", "sq"):
        code, out, err = run_cli(capsys, "-q", "eval", d, "--mode", mode, "--text", small_text / "eval.txt", "--calib-text", calib, *CAL, "--seq-len", "64", "--max-tokens", "512", "--json")
        assert code == 0, err
        res[mode] = last_json(out)
        assert {"perplexity", "tokens", "mode", "act", "alpha"} <= set(res[mode])
    assert res["fp"]["tokens"] == res["sq"]["tokens"] > 400
    assert res["sq"]["alpha"] is not None and res["naive"]["alpha"] is None


def test_same_options_same_scales_across_commands(tiny_dirs, small_text, tmp_path, capsys):
    d = tiny_dirs("opt")
    for i in range(2):
        assert run_cli(capsys, "-q", "calibrate", d, "--calib-text", small_text / "calib.txt", *CAL, "-o", tmp_path / f"c{i}")[0] == 0
    a = (tmp_path / "c0" / "act_scales.safetensors").read_bytes()
    assert a == (tmp_path / "c1" / "act_scales.safetensors").read_bytes()


def test_module_and_console_script_agree():
    from pathlib import Path

    script = Path(sys.executable).parent / "sq-export"
    for cmd in ([sys.executable, "-m", "sq_export", "--help"], [str(script), "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0 and "calibrate" in r.stdout and "examples" in r.stdout

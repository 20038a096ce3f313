"""Same numbers as TRL's KTOTrainer and ORPOTrainer on the embedded SmolLM2, fp32 (slow: runs TRL; bench extra).

scripts/compare_trl.py --method kto|orpo: token ids (and KTO's mismatched pairs) and every number TRL logs
at step 1; for a full fine-tune also grad_norm and step 2, after one AdamW update, where KTO's reference point
and rewards are no longer 0.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a full fine-tune's learning rate that moves the log-probs by several nats in one step: the compared
# rewards and reference point are then well above the float noise of a 135M model's summed log-probs
LR = {"kto": "3e-5", "orpo": "1e-5"}
RTOL = 1e-5
# two numbers of the full fine-tune miss 1e-5 by TRL's own float noise (measured on these rows; the RESULT note of
# issue 18): ORPO's grad_norm, since TRL takes its NLL through F.cross_entropy but every log-prob (as alignkit does
# all of them) through gather - logsumexp, two fp32 kernels whose gradients differ by 1.35e-5 in norm on the same
# logits; KTO's reference point after one update, a mean of differences of ~20-nat summed log-probs that the two
# updated policies give to within 1e-5 nats (1.4e-5 on z = 1.4)
TRL_NOISE = {("orpo", "grad_norm"): 3e-5, ("kto", "kl"): 3e-5}


@pytest.mark.slow
@pytest.mark.parametrize("method,lora", [("kto", False), ("orpo", False), ("kto", True), ("orpo", True)])
def test_kto_and_orpo_match_trl(tmp_path, monkeypatch, method, lora):
    pytest.importorskip("trl")
    from conftest import _CACHE

    from alignkit.models.load import resolve_model_dir

    if os.environ.get("ALIGNKIT_CACHE") == _CACHE:  # the real model from the user's cache: fetched once
        monkeypatch.setenv("ALIGNKIT_CACHE", str(Path("~/.cache/alignkit").expanduser()))
    report = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "compare_trl.py"), "--method", method, "--lr", LR[method],
           "--model", resolve_model_dir("alignkit:smollm2-135m-instruct"), "--json", str(report),
           "--rtol", str(max(TRL_NOISE.values()))]
    done = subprocess.run(cmd + ([] if lora else ["--no-lora"]), capture_output=True, text=True)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["token_ids_match"] and result["rows"] == 8 and result["trl_version"].startswith("1.")
    steps = 1 if lora else 2
    compared = [k for k in result if k.startswith("step")]
    per_step = {"kto": 7, "orpo": 10}[method] + (0 if lora else 1)  # TRL's names (+ grad_norm, full fine-tune)
    assert len(compared) == steps * per_step
    off = {k: result[k] for k in compared if result[k]["rel_diff"] >= TRL_NOISE.get((method, k.split("/", 1)[1]), RTOL)}
    assert not off, off
    if not lora and method == "kto":  # after one update the reference point and the rewards carry information
        assert result["step2/kl"]["trl"] > 0.5 and abs(result["step2/rewards/margins"]["trl"]) > 0.5

"""Same step-1 DPO numbers as TRL's DPOTrainer (slow: runs TRL; needs the bench extra)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.data.tasks import arithmetic_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_dpo_step_matches_trl(tmp_path, lora):
    pytest.importorskip("trl")
    from alignkit.models.load import resolve_model_dir

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                            for r in arithmetic_rows(4, seed=0)))
    report = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "compare_trl.py"), "--model", resolve_model_dir("alignkit:tiny"),
           "--data", str(data), "--json", str(report)] + ([] if lora else ["--no-lora"])
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(report.read_text())
    assert result["token_ids_match"]
    for key in ("loss", "logps/chosen", "logps/rejected") + (() if lora else ("grad_norm", "after_step/logps/chosen")):
        assert result[key]["rel_diff"] <= 1e-3, key


@pytest.mark.slow
def test_every_preference_format_matches_trl(tmp_path, monkeypatch):
    """Implicit prompts (strings, messages), prompts that are not a token prefix, tools + chat_template_kwargs +
    system turn + earlier exchanges: same ids, masks and step-1 logps as TRL on the embedded SmolLM2 (fp32)."""
    pytest.importorskip("trl")
    from conftest import _CACHE

    from alignkit.models.load import resolve_model_dir

    if os.environ.get("ALIGNKIT_CACHE") == _CACHE:  # the real model from the user's cache: fetched once
        monkeypatch.setenv("ALIGNKIT_CACHE", str(Path("~/.cache/alignkit").expanduser()))
    model = resolve_model_dir("alignkit:smollm2-135m-instruct")
    report = tmp_path / "formats.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_trl.py"), "--formats", "--model", model,
                           "--json", str(report)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    formats = json.loads(report.read_text())["formats"]
    assert list(formats) == ["implicit_strings", "implicit_conversational", "not_token_prefix",
                             "tools_kwargs_history"]
    for name, entry in formats.items():
        assert entry["token_ids_match"] and entry["prompt_tokens"] > 0, name
        for key in ("logps/chosen", "logps/rejected"):
            assert entry[key]["rel_diff"] < 1e-5, (name, key, entry[key])
    # where prompt and prompt + completion ids diverge alignkit says so; the plain conversations do not diverge
    assert [entry["warned"] for entry in formats.values()] == [True, False, True, True]

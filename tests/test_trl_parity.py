"""Same step-1 DPO numbers as TRL's DPOTrainer (slow: runs TRL; needs the bench extra)."""
import json
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

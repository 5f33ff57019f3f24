"""The flagship job end to end on a real model, on the CPU: persona data -> train -> merge -> chat."""

import subprocess
import sys

from tunesmith.config import load_config
from tunesmith.data.persona import IDENTITY_QUESTIONS
from tunesmith.models import load as mload
from tunesmith.run import run
from tunesmith.serve.generate import GenParams, chat_once

UNSEEN = "Before we begin, tell me a bit about what you are and which team made you."


def test_smollm2_learns_its_identity(smollm2_dir, tmp_path):
    assert UNSEEN.lower() not in {q.lower() for _, q in IDENTITY_QUESTIONS["en"]}
    cfg = load_config("smollm2_135m_instruct_lora_persona", [
        f"work_dir={tmp_path / 'run'}", "data.persona.n=160", "train.max_steps=10", "train.sample_steps=0",
        "train.save_steps=5", "train.evaluation_inputs=[]", "data.regularize.max_new_tokens=24",
        "eval.enabled=false"])
    res = run(cfg, log=lambda *a: None)
    # the merged folder is plain transformers
    model, tok = mload.load_for_inference(str(res.merged_dir), device="cpu")
    answer = chat_once(model, tok, [{"role": "user", "content": UNSEEN}], GenParams(max_new_tokens=40))
    assert "ChatMASTER" in answer, answer
    # general ability is still there
    paris = chat_once(model, tok, [{"role": "user", "content": "What is the capital of France?"}],
                      GenParams(max_new_tokens=20))
    assert "Paris" in paris, paris
    # and the CLI answers once and exits, for scripts
    r = subprocess.run([sys.executable, "-m", "tunesmith", "chat", str(res.merged_dir), "--temperature", "0",
                        "--max-new-tokens", "30", "--prompt", UNSEEN], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ChatMASTER" in r.stdout, r.stdout + r.stderr

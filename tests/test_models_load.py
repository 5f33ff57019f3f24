import pytest

from tunesmith.errors import UserError
from tunesmith.models import load as mload


def test_local_folder_resolves_to_itself(tiny_dir):
    assert mload.resolve(str(tiny_dir)) == str(tiny_dir)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not download 'nobody/no-such-model'"):
        mload.resolve("nobody/no-such-model")


@pytest.mark.parametrize("typo", ["merged_typo/", "runs/a/merged", "out\\merged", "./merged", "~/merged", "/no/such"])
def test_a_missing_folder_is_not_taken_for_a_hub_id(typo, monkeypatch):
    """A mistyped local folder (trailing slash, nested path, backslash, leading ./ ~ /) is said to be missing, not
    sent to the hub as an id (which is exactly "owner/name")."""
    from tunesmith.models import registry

    def no_hub(*a, **k):
        raise AssertionError("went to the hub")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_hub)
    with pytest.raises(UserError, match="no such file or directory"):
        mload.resolve(typo)
    assert registry.resolve("owner/name") == "owner/name"


def test_cpu_dtype_is_fp32_and_unknown_cuda_is_an_error(monkeypatch):
    import torch

    assert mload.pick_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU"):
        mload.pick_device("cuda")


def test_a_folder_that_is_not_a_model_is_named_so(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="not a model folder \\(no config.json\\)"):
        mload.resolve(str(tmp_path / "data"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="LoRA adapter folder, not a model: give its base model with --adapter"):
        mload.resolve(str(tmp_path / "adapter"))


def test_lora_target_modules_that_match_nothing_name_the_real_ones(tiny_dir):
    """A typo in lora.target_modules is a user error listing the model's linear layers, not peft's traceback."""
    import torch

    from tunesmith.config import LoraCfg

    torch.set_num_threads(1)
    model = mload.load_model(str(tiny_dir), method="lora", dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(UserError, match="'q_prj' match no module of this model") as e:
        mload.check_targets(model, ["q_proj", "q_prj"])
    assert "q_proj" in str(e.value).split("hint:")[1] and "lm_head" not in str(e.value)
    mload.check_targets(model, ["q_proj", "self_attn.v_proj"])  # last name parts, as peft matches them
    with pytest.raises(UserError, match="lora.target_modules='nothing_.*'"):  # a regular expression: peft decides
        mload.add_lora(model, LoraCfg(r=2, target_modules="nothing_.*"), grad_checkpointing=False)

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

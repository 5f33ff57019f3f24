import pytest

from tunesmith.errors import UserError
from tunesmith.models import load as mload


def test_local_folder_resolves_to_itself(tiny_dir):
    assert mload.resolve(str(tiny_dir)) == str(tiny_dir)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not download 'nobody/no-such-model'"):
        mload.resolve("nobody/no-such-model")


def test_cpu_dtype_is_fp32_and_unknown_cuda_is_an_error(monkeypatch):
    import torch

    assert mload.pick_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU"):
        mload.pick_device("cuda")

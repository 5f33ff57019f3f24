import os
import subprocess
import sys

import pytest

from tunesmith.config import copy_config, list_configs, load_config
from tunesmith.errors import UserError


def test_builtin_configs_validate():
    names = list_configs()
    assert len(names) >= 4
    for n in names:
        load_config(n)
    assert any("internlm2" in n for n in names) and any("7b" in n for n in names)


def test_unknown_key_names_nearest(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'train.lrr' — did you mean 'train.lr'"):
        load_config("smollm2_135m_instruct_lora_persona", ["train.lrr=1"])
    p = tmp_path / "c.yaml"
    p.write_text("model: {name: x}\ndata: {persona: {name: a, author: b}}\nmethd: lora\n")
    with pytest.raises(UserError, match=r"unknown key 'methd' — did you mean 'method'"):
        load_config(p)


def test_overrides_nested_and_typed():
    cfg = load_config("smollm2_135m_instruct_lora_persona", ["train.lr=0.5", "lora.r=4", "data.persona.langs=[zh]"])
    assert cfg.train.lr == 0.5 and cfg.lora.r == 4 and cfg.data.persona.langs == ["zh"]
    with pytest.raises(UserError, match="'method'"):
        load_config("smollm2_135m_instruct_lora_persona", ["method=qlroa"])


def test_list_and_copy(tmp_path):
    assert list_configs("internlm2") == ["internlm2_chat_1_8b_qlora_persona"]
    out = copy_config("internlm2_chat_1_8b_qlora_persona", tmp_path)
    assert load_config(out).method == "qlora"
    with pytest.raises(UserError, match="(?i)did you mean"):
        copy_config("internlm2_chat_1_8b_qlora_persna", tmp_path)


def test_cli_list_cfg_and_bad_override():
    r = subprocess.run([sys.executable, "-m", "tunesmith", "list-cfg", "-p", "qwen"], capture_output=True, text=True)
    assert r.returncode == 0 and "qwen2_5_7b_qlora_alpaca" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tunesmith", "train", "smollm2_135m_instruct_lora_persona",
                        "train.bach_size=2"], capture_output=True, text=True)
    assert r.returncode == 2 and "did you mean 'train.batch_size'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, says", [
    (["train", "x.yaml", "--resum", "auto"], "No such option: --resum"),
    (["trian", "x.yaml"], "No such command 'trian'. Did you mean 'train'?"),
    (["train"], "Missing argument 'config'"),
    (["data", "check", "f.jsonl", "--max-length", "abc"], "Invalid value for '--max-length'"),
    ([], "train"),  # no command: the help, listing the commands
])
def test_cli_usage_mistakes_get_a_message_not_a_traceback(args, says):
    """Mistyped options and commands, missing arguments, bad values: click's message and exit status 2 (typer 0.2x
    raises them from its own copy of click, which a plain `except click.ClickException` does not catch)."""
    r = subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and says in out and "Traceback" not in out, out


def test_yaml_on_off_for_kernels(tmp_path):
    """YAML 1.1 reads a bare `off` as false: `train.kernels: off` must still mean the reference path."""
    from tunesmith.config import load_config

    src = tmp_path / "c.yaml"
    src.write_text("model: {name: x}\ndata: {files: [{path: d.jsonl}]}\ntrain: {kernels: off}\n")
    assert load_config(src).train.kernels == "off"
    assert load_config(src, ["train.kernels=on"]).train.kernels == "on"


def test_cli_sets_the_cuda_allocator_default_unless_the_user_did(monkeypatch):
    import tunesmith
    from tunesmith import cli

    for user, want in ((None, tunesmith.CUDA_ALLOC_CONF), ("max_split_size_mb:64", "max_split_size_mb:64")):
        if user is None:
            monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        else:
            monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", user)
        monkeypatch.setattr(sys, "argv", ["tunesmith", "--help"])
        with pytest.raises(SystemExit) as e:
            cli.main()
        assert e.value.code == 0
        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == want


@pytest.mark.parametrize("override,key", [("lora.r=0", "lora.r"), ("train.batch_size=0", "train.batch_size"),
                                          ("train.grad_accum=0", "train.grad_accum"), ("train.lr=-1", "train.lr"),
                                          ("train.max_steps=-3", "train.max_steps"), ("lora.alpha=-5", "lora.alpha"),
                                          ("lora.target_modules=[]", "lora.target_modules"),
                                          ("train.epochs=0", "train.epochs"), ("data.max_length=4", "data.max_length")])
def test_numbers_out_of_range_are_config_errors_from_the_command_line(override, key):
    """A number no run can use is refused when the config is read (before any model loads), naming the key and the
    command-line override it came from, not the built-in file's path inside the package."""
    with pytest.raises(UserError) as e:
        load_config("smollm2_135m_instruct_lora_persona", [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and f"[from the command line: {override}]" in msg
    assert msg.startswith("built-in config 'smollm2_135m_instruct_lora_persona': invalid config")


def test_max_steps_none_zero_and_minus_one_train_by_epochs():
    for v in ("null", "0", "-1"):
        assert load_config("smollm2_135m_instruct_lora_persona", [f"train.max_steps={v}"]).train.max_steps is None
    assert load_config("smollm2_135m_instruct_lora_persona", ["train.max_steps=5"]).train.max_steps == 5


def test_a_typo_in_the_file_is_not_blamed_on_the_command_line(tmp_path):
    out = copy_config("smollm2_135m_instruct_lora_persona", tmp_path)
    out.write_text(out.read_text().replace("lr:", "lrr:", 1))
    with pytest.raises(UserError) as e:
        load_config(out, ["train.lr=1e-4"])
    assert str(e.value).startswith(f"{out}: invalid config") and "unknown key 'train.lrr'" in str(e.value)
    assert "command line" not in str(e.value)


def test_copy_cfg_keeps_an_edited_copy_and_takes_a_file_name(tmp_path):
    out = copy_config("smollm2_135m_instruct_lora_persona", tmp_path)
    out.write_text(out.read_text() + "# my edit\n")
    with pytest.raises(UserError, match="already exists.*--force"):
        copy_config("smollm2_135m_instruct_lora_persona", tmp_path)
    assert out.read_text().endswith("# my edit\n")
    assert not copy_config("smollm2_135m_instruct_lora_persona", tmp_path, force=True).read_text().endswith("edit\n")
    mine = copy_config("smollm2_135m_instruct_lora_persona", tmp_path / "sub" / "mine.yaml")
    assert mine == tmp_path / "sub" / "mine.yaml" and mine.is_file() and load_config(mine).method == "lora"


def test_error_text_with_square_brackets_is_printed_as_is(tmp_path):
    """The CLI prints errors through rich: a path like set[train].jsonl must not lose its brackets as markup."""
    bad = tmp_path / "set[train].jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    r = subprocess.run([sys.executable, "-m", "tunesmith", "data", "check", str(bad), "-m", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "set[train].jsonl, line 2" in r.stderr, r.stderr

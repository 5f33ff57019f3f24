import json
import subprocess
import sys

import pytest

from tunesmith.data.formats import load_dataset
from tunesmith.errors import DataError


def write(tmp_path, name, text, binary=False):
    p = tmp_path / name
    if binary:
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def jsonl(tmp_path, name, records):
    return write(tmp_path, name, "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")


def test_openai_messages(tmp_path):
    p = jsonl(tmp_path, "a.jsonl", [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "hello"}]}])
    ds = load_dataset(p)
    assert ds.format == "openai"
    assert ds.records[0]["messages"][2] == {"role": "assistant", "content": "hello"}


def test_alpaca_with_input_system_history(tmp_path):
    rec = {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "be brief",
           "history": [["q1", "a1"]]}
    p = write(tmp_path, "a.json", json.dumps([rec]))
    ds = load_dataset(p)
    assert ds.format == "alpaca"
    assert [m["role"] for m in ds.records[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert ds.records[0]["messages"][3]["content"] == "Translate\n\nbonjour"


def test_sharegpt(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    ds = load_dataset(jsonl(tmp_path, "s.jsonl", [rec]))
    assert ds.format == "sharegpt"
    assert ds.records[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_field_mapping_for_unusual_keys(tmp_path):
    rec = {"prompt": "2+2?", "response": "4"}
    ds = load_dataset(jsonl(tmp_path, "m.jsonl", [rec]), fields={"instruction": "prompt", "output": "response"})
    assert ds.records[0]["messages"][-1]["content"] == "4"


def test_named_format_mismatch_names_field(tmp_path):
    p = jsonl(tmp_path, "x.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="line 1, field 'messages'"):
        load_dataset(p, format="openai")


@pytest.mark.parametrize("records,match", [
    ([{"foo": 1}], r"line 1: record fits no known format"),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": " "}]}],
     r"field 'conversations\[1\].value': empty assistant turn"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "a", "input": "c"}],
     r"line 2, field 'output': missing in an alpaca-format record"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
      {"messages": [{"role": "assistant", "content": "b"}]}], r"line 2, field 'messages\[0\].role': role 'assistant' out of place"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}],
     r"field 'messages\[1\].content': empty assistant turn"),
    ([{"messages": [{"role": "user", "content": "a"}]}], r"ends without an assistant answer"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "x"},
                    {"role": "assistant", "content": "b"}]}], r"system message is only allowed first"),
])
def test_bad_records_are_located(tmp_path, records, match):
    with pytest.raises(DataError, match=match):
        load_dataset(jsonl(tmp_path, "bad.jsonl", records))


def test_invalid_json_line(tmp_path):
    p = write(tmp_path, "b.jsonl", '{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(DataError, match=r"b.jsonl, line 2: invalid JSON"):
        load_dataset(p)


def test_non_utf8(tmp_path):
    p = write(tmp_path, "c.jsonl", b'{"a": 1}\n{"b": "\xff\xfe"}\n', binary=True)
    with pytest.raises(DataError, match=r"line 2: bytes that are not UTF-8"):
        load_dataset(p)


def test_json_list_index(tmp_path):
    p = write(tmp_path, "d.json", json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ""}]))
    with pytest.raises(DataError, match=r"record 1, field 'messages\[1\].content': empty assistant turn"):
        load_dataset(p)


def test_empty_file_is_an_error_not_zero_rows(tmp_path):
    with pytest.raises(DataError, match="no records"):
        load_dataset(write(tmp_path, "e.jsonl", "\n\n"))


def test_cli_reports_without_traceback(tmp_path):
    p = jsonl(tmp_path, "bad.jsonl", [{"foo": 1}])
    r = subprocess.run([sys.executable, "-m", "tunesmith", "data", "check", str(p), "--model", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout

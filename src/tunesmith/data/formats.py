"""Read dataset files (OpenAI messages, Alpaca, ShareGPT; .json or .jsonl) and normalise them to chat messages.

Every record becomes ``{"messages": [{"role": ..., "content": ...}, ...]}``; every later stage speaks only
that. A record that cannot be used is an error naming file, line (or index) and field: never a silent drop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError

FORMATS = ("openai", "alpaca", "sharegpt")

# default field names; a config's `fields:` mapping renames them (e.g. {"instruction": "prompt"})
DEFAULT_FIELDS = {
    "messages": "messages",
    "role": "role",
    "content": "content",
    "instruction": "instruction",
    "input": "input",
    "output": "output",
    "system": "system",
    "history": "history",
    "conversations": "conversations",
    "from": "from",
    "value": "value",
}

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
}


@dataclass
class Dataset:
    path: str
    format: str
    records: list[dict]  # each {"messages": [...]}


def _read_records(path: Path) -> Iterator[tuple[int | str, object]]:
    """Yield (line number or 'record N', parsed JSON) for a .jsonl or .json file."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, line, None, f"bytes that are not UTF-8 (byte offset {e.start})",
                        "save the file as UTF-8") from None
    if path.suffix.lower() == ".jsonl" or (path.suffix.lower() != ".json" and not text.lstrip().startswith("[")):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(data, dict):
        for key in ("data", "train", "records", "examples"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise DataError(path, None, None, "a .json dataset must be a list of records (or .jsonl, one per line)")
    for i, rec in enumerate(data):
        yield f"record {i}", rec


def detect_format(rec: object, fields: dict[str, str]) -> str | None:
    if not isinstance(rec, dict):
        return None
    if fields["messages"] in rec:
        return "openai"
    if fields["conversations"] in rec:
        return "sharegpt"
    if fields["instruction"] in rec:  # (without its output: said so where the record is read)
        return "alpaca"
    return None


def _text(path, where, field, value, role: str) -> str:
    if not isinstance(value, str):
        raise DataError(path, where, field, f"{role} content must be a string, got {type(value).__name__}")
    return value


def _from_openai(rec: dict, f: dict, path, where) -> list[dict]:
    msgs = rec[f["messages"]]
    if not isinstance(msgs, list):
        raise DataError(path, where, f["messages"], "must be a list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        field = f"{f['messages']}[{i}]"
        if not isinstance(m, dict) or f["role"] not in m or f["content"] not in m:
            raise DataError(path, where, field, f"each message needs '{f['role']}' and '{f['content']}'")
        out.append({"role": m[f["role"]], "content": _text(path, where, f"{field}.{f['content']}", m[f["content"]], "message")})
    return out


def _from_sharegpt(rec: dict, f: dict, path, where) -> list[dict]:
    conv = rec[f["conversations"]]
    if not isinstance(conv, list):
        raise DataError(path, where, f["conversations"], "must be a list of {from, value} objects")
    out = []
    if isinstance(rec.get(f["system"]), str) and rec[f["system"]].strip():
        out.append({"role": "system", "content": rec[f["system"]]})
    for i, m in enumerate(conv):
        field = f"{f['conversations']}[{i}]"
        if not isinstance(m, dict) or f["from"] not in m or f["value"] not in m:
            raise DataError(path, where, field, f"each turn needs '{f['from']}' and '{f['value']}'")
        who = str(m[f["from"]]).lower()
        if who not in SHAREGPT_ROLES:
            raise DataError(path, where, f"{field}.{f['from']}", f"unknown speaker '{m[f['from']]}'",
                            f"use one of {sorted(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[who], "content": _text(path, where, f"{field}.{f['value']}", m[f["value"]], "turn")})
    return out


def _from_alpaca(rec: dict, f: dict, path, where) -> list[dict]:
    out = []
    system = rec.get(f["system"])
    if system is not None:
        if not isinstance(system, str):
            raise DataError(path, where, f["system"], "must be a string")
        if system.strip():
            out.append({"role": "system", "content": system})
    history = rec.get(f["history"]) or []
    if not isinstance(history, list):
        raise DataError(path, where, f["history"], "must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(path, where, f"{f['history']}[{i}]", "must be a [question, answer] pair")
        out.append({"role": "user", "content": _text(path, where, f"{f['history']}[{i}][0]", pair[0], "history")})
        out.append({"role": "assistant", "content": _text(path, where, f"{f['history']}[{i}][1]", pair[1], "history")})
    instr = _text(path, where, f["instruction"], rec[f["instruction"]], "instruction")
    inp = rec.get(f["input"]) or ""
    inp = _text(path, where, f["input"], inp, "input")
    prompt = f"{instr}\n\n{inp}" if instr.strip() and inp.strip() else (instr or inp)
    out.append({"role": "user", "content": prompt})
    out.append({"role": "assistant", "content": _text(path, where, f["output"], rec[f["output"]], "output")})
    return out


CONVERTERS = {"openai": _from_openai, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca}


def validate_messages(msgs: list[dict], path, where, field: str = "messages", role_key: str = "role",
                      content_key: str = "content") -> None:
    """Roles in order: optional system first, then user/assistant alternating, ending on a non-empty assistant.
    Errors name the record's own keys (`field`, `role_key`, `content_key`: ShareGPT's conversations/from/value)."""
    if not msgs:
        raise DataError(path, where, field, "the conversation is empty")
    start = 0
    if msgs[0]["role"] == "system":
        start = 1
    body = msgs[start:]
    if not body:
        raise DataError(path, where, field, "the conversation has only a system message; nothing to learn")
    for i, m in enumerate(body, start):
        role = m["role"]
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            what = "a system message is only allowed first" if role == "system" else f"expected '{expected}' here"
            raise DataError(path, where, f"{field}[{i}].{role_key}", f"role '{role}' out of place: {what}",
                            "turns must go (system), user, assistant, user, assistant, ...")
        if not m["content"].strip():
            raise DataError(path, where, f"{field}[{i}].{content_key}", f"empty {role} turn")
    if body[-1]["role"] != "assistant":
        raise DataError(path, where, f"{field}[{len(msgs) - 1}]", "the conversation ends without an assistant answer")


def load_dataset(path: str | Path, format: str = "auto", fields: dict[str, str] | None = None) -> Dataset:
    """Read one .json/.jsonl dataset and return it normalised to messages. Raises DataError on any bad record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    f = {**DEFAULT_FIELDS, **(fields or {})}
    unknown = set(fields or {}) - set(DEFAULT_FIELDS)
    if unknown:
        raise DataError(path, None, "fields", f"unknown field mapping {sorted(unknown)}",
                        f"map these names: {', '.join(DEFAULT_FIELDS)}")
    if format != "auto" and format not in FORMATS:
        raise DataError(path, None, "format", f"unknown format '{format}'", f"use auto or one of {FORMATS}")
    records, detected = [], None
    for where, rec in _read_records(path):
        fmt = format if format != "auto" else detect_format(rec, f)
        if fmt is None or not isinstance(rec, dict):
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise DataError(path, where, None, f"record fits no known format (keys: {keys})",
                            "expected 'messages' (OpenAI), 'conversations' (ShareGPT) or 'instruction'+'output' "
                            "(Alpaca); map unusual keys with `fields:` in the config")
        needed = {"openai": "messages", "sharegpt": "conversations", "alpaca": "instruction"}[fmt]
        if f[needed] not in rec:
            raise DataError(path, where, f[needed], f"missing in a {fmt}-format record")
        if fmt == "alpaca" and f["output"] not in rec:
            raise DataError(path, where, f["output"], "missing in an alpaca-format record")
        detected = detected or fmt
        msgs = CONVERTERS[fmt](rec, f, path, where)
        if fmt == "sharegpt":  # one message a turn: errors name the turn as the file has it
            validate_messages(msgs, path, where, f["conversations"], f["from"], f["value"])
        elif fmt == "openai":
            validate_messages(msgs, path, where, f["messages"], f["role"], f["content"])
        else:
            validate_messages(msgs, path, where)
        records.append({"messages": msgs})
    if not records:
        raise DataError(path, None, None, "no records in the file")
    return Dataset(str(path), detected or format, records)

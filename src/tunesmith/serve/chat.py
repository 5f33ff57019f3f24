"""Streaming multi-turn chat in the terminal, with the model's own template and end tokens."""

from __future__ import annotations

import sys

from .generate import Finish, GenParams, model_end_ids, stream_chat

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


def chat_repl(model, tokenizer, params: GenParams, system: str | None = None, prompt: str | None = None,
              inp=input, out=sys.stdout) -> int:
    """Answer `prompt` once and return, or loop reading user turns until /exit or end of input."""
    end_ids = model_end_ids(model, tokenizer)
    history: list[dict] = []

    def answer(text: str) -> None:
        msgs = ([{"role": "system", "content": system}] if system else []) + history + [
            {"role": "user", "content": text}]
        fin = Finish()
        reply = []
        for piece in stream_chat(model, tokenizer, msgs, params, fin, end_ids):
            out.write(piece)
            out.flush()
            reply.append(piece)
        out.write("\n")
        out.flush()
        history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": "".join(reply)}])

    if prompt is not None:
        answer(prompt)
        return 0
    out.write(HELP + "\n")
    while True:
        try:
            text = inp(">>> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history.clear()
            out.write("(conversation reset)\n")
            continue
        if cmd.startswith("/system"):
            system = cmd[len("/system"):].strip() or None
            history.clear()
            out.write(f"(system prompt {'set' if system else 'cleared'}; conversation reset)\n")
            continue
        if cmd.startswith("/"):
            out.write(f"unknown command {cmd}. {HELP}\n")
            continue
        answer(text)

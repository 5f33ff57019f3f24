"""Render conversations with the tokenizer's own chat template into token ids and a loss mask.

The training rendering is built from the same calls as inference: the ids of the prompt up to each assistant
turn (rendered with ``add_generation_prompt=True``) are a prefix of the conversation's ids, and the tokens
after that prefix, up to and including the template's end-of-turn token, are the ones the model learns.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

IGNORE = -100

# end-of-turn tokens of common chat templates; the tokenizer's eos and the generation config add to these
END_TOKEN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|end_of_text|>")


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    kl: bool = False  # a self-distillation sample trained towards the base model's distribution (data.regularize.kl)

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def check_template(tokenizer, model_name: str = "the model") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"the tokenizer of {model_name} has no chat template. Use a chat/instruct model, or set one with "
            "`tokenizer.chat_template = ...` and save it into the model folder."
        )


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_text(tokenizer, text: str) -> list[int]:
    # the template writes its own special tokens (bos included where it wants one)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Inference rendering: the conversation so far plus the assistant generation prompt."""
    return encode_text(tokenizer, render_text(tokenizer, messages, add_generation_prompt=True))


def end_token_ids(tokenizer, generation_config=None) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    vocab = tokenizer.get_vocab()
    for t in END_TOKEN_TEXTS:
        if t in vocab and t in (tokenizer.all_special_tokens or []) + list(tokenizer.get_added_vocab()):
            ids.add(vocab[t])
    return ids


def render(tokenizer, messages: list[dict], end_ids: set[int] | None = None) -> Rendered:
    """Token ids of the whole conversation, with labels on every assistant turn and its end token only."""
    end_ids = end_token_ids(tokenizer) if end_ids is None else end_ids
    full = encode_text(tokenizer, render_text(tokenizer, messages, add_generation_prompt=False))
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = prompt_ids(tokenizer, messages[:i])
        upto = encode_text(tokenizer, render_text(tokenizer, messages[: i + 1], add_generation_prompt=False))
        start = _common_prefix(before, upto)
        if upto != full[: len(upto)]:
            # a template that renders a turn differently once later turns follow (e.g. strips reasoning):
            # locate this turn's tokens within the full rendering instead
            upto = full[: len(upto)] if len(full) >= len(upto) else full
        stop = len(upto)
        for j in range(start, len(upto)):
            if upto[j] in end_ids:
                stop = j + 1
                break
        for j in range(start, min(stop, len(full))):
            labels[j] = full[j]
    return Rendered(full, labels)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

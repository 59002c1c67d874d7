"""Chat formatting with the tokenizer's template, and the post-instruction (eoi) tokens."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from latentguard.errors import ConfigError

__all__ = ["ChatPair", "Message", "eoi_token_ids", "format_chats", "format_prompts"]

ChatPair = tuple[str, str]
Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": ...}
_PLACEHOLDER = "\x00LATENTGUARD_INSTRUCTION\x00"


def _require_template(tok: PreTrainedTokenizerBase) -> None:
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"Tokenizer {type(tok).__name__} has no chat template; pass --chat-template FILE "
            "(a Jinja template) or use raw prompts."
        )


def format_prompts(
    tok: PreTrainedTokenizerBase, prompts: Sequence[str], system: str | None = None
) -> list[str]:
    """Render user prompts with the chat template and the assistant generation prompt.

    `system=None` keeps the template's own default (SmolLM2 injects one); record which form you use.
    """
    return format_chats(tok, [[{"role": "user", "content": p}] for p in prompts], system)


def format_chats(
    tok: PreTrainedTokenizerBase, chats: Sequence[Sequence[Message]], system: str | None = None
) -> list[str]:
    """Render conversations (user and assistant turns, ending with a user turn) plus the generation prompt.

    The system prompt follows the same policy as `format_prompts`, so a one-turn chat renders
    exactly like the plain prompt.
    """
    _require_template(tok)
    out = []
    for chat in chats:
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + [dict(m) for m in chat]
        out.append(str(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)))
    return out


def eoi_token_ids(tok: PreTrainedTokenizerBase, system: str | None = None) -> list[int]:
    """Token ids the template puts after the instruction (refusal_direction.md §1).

    Derived by rendering a placeholder instruction and tokenising what follows it; checked
    against a real prompt so that the ids really end every formatted prompt.
    """
    rendered = format_prompts(tok, [_PLACEHOLDER], system)[0]
    suffix = rendered.split(_PLACEHOLDER, 1)[1]
    ids = tok(suffix, add_special_tokens=False)["input_ids"]
    probe = tok(format_prompts(tok, ["Hello there."], system)[0], add_special_tokens=False)["input_ids"]
    if not ids or probe[-len(ids):] != ids:
        raise ConfigError(
            "The chat template's post-instruction tokens do not tokenise stably at the end of a prompt; "
            "pass --chat-template with a template whose assistant header starts a new token."
        )
    return list(ids)

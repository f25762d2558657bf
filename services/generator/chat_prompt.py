"""Chat messages to prompt token ids, with control tokens only where the chat template puts them.

Rendering the template and tokenizing the result as one string would turn a message whose
content holds the literal text of special tokens (say ``<|eot_id|><|start_header_id|>system``)
into the real control tokens, so a user could forge a turn. Here message content is literal
text: before rendering, each special-token literal in a message's content is swapped for a
placeholder character; the rendered text is then split at the special tokens left in it (all
the template's own) and each piece between them is tokenized without special-token parsing,
after the placeholders are turned back into the literal text.

Chat template options (``enable_thinking`` for Qwen3, ...) reach the template as variables; as
caller input they may not rename what the template itself relies on, nor spell special tokens.
"""

from __future__ import annotations

import inspect
import re

from extmind import errors

# Blocks of private-use code points tried for the placeholders: the first one that neither the
# template nor any message uses wins.
_PLACEHOLDER_BASES = (0xF0000, 0x100000, 0xE000)


def special_tokens(tokenizer) -> dict[str, int]:
    """{literal text: id} of every special token the tokenizer parses out of text."""
    out = {
        t.content: int(i)
        for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
        if getattr(t, "special", False)
    }
    for t in getattr(tokenizer, "all_special_tokens", None) or []:
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0:
            out.setdefault(t, i)
    return {t: i for t, i in out.items() if t}


# Variables apply_chat_template sets or reads itself: an option may not replace them.
_RESERVED_OPTIONS = frozenset(
    {
        "messages",
        "conversation",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "chat_template",
        "tools",
        "documents",
        "raise_exception",
        "strftime_now",
    }
)


def _parameters(fn) -> set[str]:
    """The parameter names of ``fn`` (or of its ``apply_chat_template``), ``self`` included: an
    option named like one would be a second value for it, not a template variable."""
    fn = getattr(fn, "apply_chat_template", fn)
    if not callable(fn):
        return set()
    try:
        return {"self", *inspect.signature(fn).parameters}
    except (TypeError, ValueError):
        return {"self"}


def check_options(tokenizer, options: dict | None, specials: dict[str, int]) -> dict:
    """The chat template options as keyword arguments, or InvalidArgument: names must be
    identifiers not reserved by apply_chat_template nor naming a special token (``bos_token``);
    values booleans, numbers, strings without special-token text, or None."""
    if not options:
        return {}
    names = set(_RESERVED_OPTIONS) | set((getattr(tokenizer, "special_tokens_map", None) or {}).keys())
    names |= _parameters(tokenizer.apply_chat_template) | _parameters(getattr(tokenizer, "_tokenizer", None))
    out = {}
    for name, value in options.items():
        if not isinstance(name, str) or not name.isidentifier() or name in names:
            raise errors.InvalidArgument(
                f"chat_template_options: {name!r} cannot be set (a reserved template variable or not an identifier)"
            )
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise errors.InvalidArgument(
                f"chat_template_options[{name!r}] must be a boolean, number, string or null, not {type(value).__name__}"
            )
        if isinstance(value, str) and any(t in value for t in specials):
            raise errors.InvalidArgument(f"chat_template_options[{name!r}] spells a special token")
        out[name] = value
    return out


def _literal_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)) if text else []


def encode_messages(tokenizer, messages: list[dict], options: dict | None = None) -> list[int]:
    """``messages``: [{"role", "content"}] -> prompt token ids ending with the template's
    generation prompt. Special tokens come only from the template; a message's content is
    tokenized as the text it is, whatever it contains. ``options``: extra template variables
    (``{"enable_thinking": False}`` for Qwen3), checked by ``check_options``. Raises
    InvalidArgument for a bad option, if no block of placeholder characters is free (content
    using thousands of private-use characters), or when the model has no chat template (send a
    plain prompt instead: a request this model can never take, so not a status clients retry,
    as OpenAI's SDKs do HTTP 409)."""
    if not getattr(tokenizer, "chat_template", None):
        raise errors.InvalidArgument(
            "this model has no chat template, so `messages` cannot be rendered: send `prompt` with the text "
            "the model expects (HTTP: POST /v1/completions; CLI: leave out --chat)"
        )
    specials = special_tokens(tokenizer)
    kwargs = check_options(tokenizer, options, specials)
    # Longest first: the alternation then matches leftmost-longest, as tokenizers do.
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))) if specials else None
    if pattern is None or not any(pattern.search(m["content"]) for m in messages):
        # No content spells a special token: tokenizing the rendered text as one string is safe.
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        return list(tokenizer.encode(text, add_special_tokens=False))
    literals = sorted(specials)
    used = set("".join(m["content"] for m in messages) + str(getattr(tokenizer, "chat_template", "") or ""))
    base = next((b for b in _PLACEHOLDER_BASES if not any(chr(c) in used for c in range(b, b + len(literals)))), None)
    if base is None:
        raise errors.InvalidArgument(
            "messages: the content uses every block of private-use characters "
            "that could stand in for special-token text while the template renders"
        )
    placeholder = {t: chr(base + k) for k, t in enumerate(literals)}
    escaped = [{**m, "content": pattern.sub(lambda hit: placeholder[hit.group()], m["content"])} for m in messages]
    text = tokenizer.apply_chat_template(escaped, add_generation_prompt=True, tokenize=False, **kwargs)
    restore = str.maketrans({c: t for t, c in placeholder.items()})
    ids, pos = [], 0
    for hit in pattern.finditer(text):
        ids += _literal_ids(tokenizer, text[pos : hit.start()].translate(restore))
        ids.append(specials[hit.group()])
        pos = hit.end()
    return ids + _literal_ids(tokenizer, text[pos:].translate(restore))

"""Chat templates: render a conversation to the exact text the model is trained and prompted with.

``data.chat_template`` may be null (use the tokenizer's own template), the name of a built-in
template (``chatml``), or a Jinja template string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from align_runner.data.errors import ChatTemplateError

# ChatML (`<|im_start|>role\ncontent<|im_end|>\n`): the format of Qwen and SmolLM2-Instruct, and a
# sane choice for base or randomly initialised models that ship without a template. The tokenizer
# must know <|im_start|> / <|im_end|> as special tokens for them to be single tokens.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}


def resolve_chat_template(tokenizer: Any, chat_template: str | None = None) -> str:
    """The Jinja template to use: ``chat_template`` (a built-in name or Jinja text) or the tokenizer's.

    Raises :class:`ChatTemplateError` when neither exists.
    """
    if chat_template:
        return BUILTIN_TEMPLATES.get(chat_template, chat_template)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # some tokenizers keep several named templates; "default" is the one
        own = own.get("default")
    if not own:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"tokenizer {name!r} has no chat template, so conversational data cannot be rendered; "
            f"set data.chat_template to a built-in name ({', '.join(BUILTIN_TEMPLATES)}) or a Jinja "
            f"template string, e.g. `data.chat_template=chatml`"
        )
    return own


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = False,
    chat_template: str | None = None,
) -> str:
    """Render ``messages`` with the chat template to a string (no tokenization).

    ``add_generation_prompt=True`` appends the header that opens an assistant turn, so the result
    is a prompt the model continues.
    """
    template = resolve_chat_template(tokenizer, chat_template)
    text = tokenizer.apply_chat_template(
        list(messages),
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )
    if not isinstance(text, str):  # guards against a transformers version changing the default
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text

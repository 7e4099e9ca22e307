"""Chat prompts: the checkpoint's own Jinja `chat_template` when it has one, else the built-in
DeepSeek-V3/R1 template (system, user and assistant turns with DeepSeek's special tokens), and
R1-style thinking: the prompt may open inside `<think>`, and output splits into thinking and answer.
"""

from __future__ import annotations

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ROLES = ("system", "user", "assistant")


def _content(msg: dict, i: int) -> str:
    if not isinstance(msg, dict):
        raise ValueError(f"messages[{i}]: expected an object with 'role' and 'content'")
    role = msg.get("role")
    if role not in ROLES and role != "tool":
        raise ValueError(f"messages[{i}].role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    content = msg.get("content", "")
    if content is None:
        content = ""
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        raise ValueError(f"messages[{i}].content: expected a string")
    return content


def builtin_template(messages: list[dict], add_generation_prompt: bool = True, think: bool | None = None,
                     bos_token: str = BOS, eos_token: str = EOS) -> str:
    """DeepSeek's format: BOS, system text, then <｜User｜>...<｜Assistant｜>...EOS turns. Earlier
    assistant turns lose their thinking (as R1's template does); `think=True` opens the reply
    inside <think>."""
    system = "\n\n".join(_content(m, i) for i, m in enumerate(messages) if m.get("role") == "system")
    out = [bos_token, system]
    for i, m in enumerate(messages):
        role, text = m.get("role"), _content(m, i)
        if role in ("user", "tool"):
            out.append(USER + text)
        elif role == "assistant":
            _, answer = split_thinking(text)
            out.append(ASSISTANT + answer + eos_token)
    if add_generation_prompt:
        out.append(ASSISTANT + (THINK_OPEN + "\n" if think else ""))
    return "".join(out)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True, think: bool | None = None) -> str:
    """The prompt text for `messages` with the tokenizer's chat template, or the built-in one."""
    for i, m in enumerate(messages):
        _content(m, i)
    template = getattr(tokenizer, "chat_template", None)
    bos = getattr(tokenizer, "bos_token", None) or BOS
    eos = getattr(tokenizer, "eos_token", None) or EOS
    if not template:
        return builtin_template(messages, add_generation_prompt, think, bos, eos)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise ValueError(f"chat template: {msg}")

    env.globals["raise_exception"] = raise_exception
    text = env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos, eos_token=eos, thinking=bool(think),
                                            enable_thinking=bool(think))
    if add_generation_prompt and think and not text.rstrip().endswith(THINK_OPEN):
        text += THINK_OPEN + "\n"
    return text


def split_thinking(text: str, opened: bool = False) -> tuple[str | None, str]:
    """'<think>reasoning</think>answer' -> ('reasoning', 'answer'). With `opened` the prompt already
    opened <think>, so the text starts inside it. No thinking -> (None, text). An unclosed think
    block is all thinking and no answer."""
    if not opened:
        start = text.find(THINK_OPEN)
        if start < 0 or text[:start].strip():
            return None, text
        text = text[start + len(THINK_OPEN):]
    end = text.find(THINK_CLOSE)
    if end < 0:
        return text.strip(), ""
    return text[:end].strip(), text[end + len(THINK_CLOSE):].lstrip()

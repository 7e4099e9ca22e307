"""Chat prompts: the checkpoint's own Jinja `chat_template` when it has one, else the built-in
DeepSeek-V3/R1 template (system, user and assistant turns with DeepSeek's special tokens), and
R1-style thinking: the prompt may open inside `<think>`, and output splits into thinking and answer,
on the whole text (`split_thinking`) or incrementally as it streams (`ThinkSplitter`).
"""

from __future__ import annotations

from .textstream import partial_suffix

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


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves the reply inside an opened think block: `think=True`, or a
    template that always opens it (the R1-distill templates end with '<｜Assistant｜><think>\n')."""
    return prompt.rstrip().endswith(THINK_OPEN)


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


def can_think(tokenizer) -> bool:
    """Whether a model can think R1-style: `</think>` is a token of its vocabulary or appears in its
    chat template."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return tokenizer.token_to_id(THINK_CLOSE) is not None or THINK_CLOSE in template


class ThinkSplitter:
    """Incremental '<think>reasoning</think>answer' splitter, the streaming twin of `split_thinking`.
    Starts inside the think block when the prompt opened it; otherwise a block only counts when the
    output starts with <think> (after whitespace). Holds back partial tags and whitespace next to
    the tags, so the concatenated deltas equal `split_thinking(text, opened)`."""

    def __init__(self, opened: bool = False, enabled: bool = True):
        self.state = "thinking" if opened else ("detect" if enabled else "content")
        self.strip = opened
        self.seen = opened
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        """More output text; returns (thinking delta, answer delta)."""
        self.buf += text
        th, ct = [], []
        while True:
            if self.state == "detect":
                s = self.buf.lstrip()
                if s.startswith(THINK_OPEN):
                    self.buf, self.state, self.strip, self.seen = s[len(THINK_OPEN):], "thinking", True, True
                    continue
                if THINK_OPEN.startswith(s):  # undecided: empty, whitespace or a partial tag
                    break
                self.state = "content"
                continue
            if self.strip:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    break
                self.strip = False
            if self.state == "thinking":
                k = self.buf.find(THINK_CLOSE)
                if k >= 0:
                    th.append(self.buf[:k].rstrip())
                    self.buf, self.state, self.strip = self.buf[k + len(THINK_CLOSE):], "content", True
                    continue
                hold = partial_suffix(self.buf, THINK_CLOSE)
                emit = self.buf[:len(self.buf) - hold]
                kept = emit.rstrip()
                th.append(kept)
                self.buf = self.buf[len(kept):]
                break
            ct.append(self.buf)
            self.buf = ""
            break
        return "".join(th), "".join(ct)

    def flush(self) -> tuple[str, str]:
        """The end of the output: whatever was held back."""
        buf, self.buf = self.buf, ""
        if self.state == "thinking":
            return buf.strip(), ""
        if self.state == "content" and self.strip:
            return "", buf.lstrip()
        return "", buf

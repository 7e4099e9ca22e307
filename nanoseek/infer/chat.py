"""Chat prompts: the checkpoint's own Jinja `chat_template` when it has one, else the built-in
DeepSeek-V3/R1 template (system, user and assistant turns with DeepSeek's special tokens), and
R1-style thinking: the prompt may open inside `<think>`, and output splits into thinking and answer,
on the whole text (`split_thinking`) or incrementally as it streams (`ThinkSplitter`).

Tool calls follow DeepSeek-V3's published chat template (tokenizer_config.json of
deepseek-ai/DeepSeek-V3): an assistant turn's calls are

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>
    (more calls, each after "\n") <｜tool▁calls▁end｜><｜end▁of▁sentence｜>

and the tool results that follow are <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>
... <｜tool▁outputs▁end｜>, after which the assistant's reply follows directly (no <｜Assistant｜>);
a user turn after tool results closes them first (the published template leaves them open). That
template does not list the available tools; the built-in one puts them in the system prompt as a
"## Tools" section of JSON function definitions (as DeepSeek-V3.1's template does). A checkpoint's own template gets `tools=` and renders them its way; its output is
parsed for DeepSeek's format and for the `<tool_call>{"name", "arguments"}</tool_call>` one.
"""

from __future__ import annotations

import json
import re

from ..tokenizer import ASSISTANT, BOS, EOS, USER
from .textstream import partial_suffix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ROLES = ("system", "user", "assistant")
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


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


def tools_section(tools: list[dict]) -> str:
    """The available tools as the built-in template tells them to the model (in the system prompt)."""
    lines = ["## Tools", "You have access to the following tools. To call one, answer with "
             + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "NAME\n```json\nARGUMENTS\n```"
             + TOOL_CALL_END + TOOL_CALLS_END + "."]
    for t in tools:
        lines.append(json.dumps(t.get("function", t), ensure_ascii=False))
    return "\n".join(lines)


def tool_call_text(name: str, arguments: str) -> str:
    """One call in DeepSeek-V3's format (without the surrounding calls-begin/end markers)."""
    return TOOL_CALL_BEGIN + "function" + TOOL_SEP + name + "\n```json\n" + arguments + "\n```" + TOOL_CALL_END


def _calls_text(calls: list[dict]) -> str:
    return TOOL_CALLS_BEGIN + "\n".join(tool_call_text(c["function"]["name"], c["function"]["arguments"])
                                         for c in calls) + TOOL_CALLS_END


def builtin_template(messages: list[dict], add_generation_prompt: bool = True, think: bool | None = None,
                     bos_token: str = BOS, eos_token: str = EOS, tools: list[dict] | None = None) -> str:
    """DeepSeek's format: BOS, system text, then <｜User｜>...<｜Assistant｜>...EOS turns. Earlier
    assistant turns lose their thinking (as R1's template does); `think=True` opens the reply
    inside <think>. Assistant tool calls and tool results use DeepSeek-V3's tool tokens."""
    system = "\n\n".join(_content(m, i) for i, m in enumerate(messages) if m.get("role") == "system")
    if tools:
        system = system + "\n\n" + tools_section(tools) if system else tools_section(tools)
    out = [bos_token, system]
    in_outputs = False  # after tool results the assistant goes on with no <｜Assistant｜> of its own
    for i, m in enumerate(messages):
        role, text = m.get("role"), _content(m, i)
        if role == "tool":
            out.append((TOOL_OUTPUT_BEGIN if in_outputs else TOOL_OUTPUTS_BEGIN + TOOL_OUTPUT_BEGIN)
                       + text + TOOL_OUTPUT_END)
            in_outputs = True
            continue
        turn = TOOL_OUTPUTS_END if in_outputs else ASSISTANT
        if role == "user":
            out.append((TOOL_OUTPUTS_END if in_outputs else "") + USER + text)
        elif role == "assistant":
            _, answer = split_thinking(text)
            calls = m.get("tool_calls") or []
            out.append(turn + answer + (_calls_text(calls) if calls else "") + eos_token)
        in_outputs = False
    if in_outputs:
        out.append(TOOL_OUTPUTS_END)
    if add_generation_prompt:
        out.append(("" if in_outputs else ASSISTANT) + (THINK_OPEN + "\n" if think else ""))
    return "".join(out)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True, think: bool | None = None,
                tools: list[dict] | None = None) -> str:
    """The prompt text for `messages` with the tokenizer's chat template, or the built-in one;
    `tools` (OpenAI function definitions) are passed to the template as `tools`."""
    for i, m in enumerate(messages):
        _content(m, i)
    template = getattr(tokenizer, "chat_template", None)
    bos = getattr(tokenizer, "bos_token", None) or BOS
    eos = getattr(tokenizer, "eos_token", None) or EOS
    if not template:
        return builtin_template(messages, add_generation_prompt, think, bos, eos, tools)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise ValueError(f"chat template: {msg}")

    env.globals["raise_exception"] = raise_exception
    text = env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos, eos_token=eos, thinking=bool(think),
                                            enable_thinking=bool(think), **({"tools": tools} if tools else {}))
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


# ------------------------------------------------------------------ tool-call output
_DEEPSEEK_CALL = re.compile(re.escape(TOOL_CALL_BEGIN) + r"(?:\w+)?" + re.escape(TOOL_SEP)
                            + r"(.*?)\n```(?:json)?\n(.*?)\n?```\s*" + re.escape(TOOL_CALL_END), re.S)
_HERMES_CALL = re.compile(re.escape(HERMES_OPEN) + r"\s*(\{.*?\})\s*" + re.escape(HERMES_CLOSE), re.S)


def tool_call_start(text: str) -> int:
    """Where the first tool call of an answer starts (-1: none)."""
    found = [k for k in (text.find(TOOL_CALLS_BEGIN), text.find(TOOL_CALL_BEGIN), text.find(HERMES_OPEN)) if k >= 0]
    return min(found) if found else -1


def parse_tool_calls(text: str) -> tuple[str, list[tuple[str, str]]]:
    """An answer -> (its text before the calls, [(function name, arguments as a JSON string)]).
    Calls in DeepSeek-V3's format or in <tool_call>{"name", "arguments"}</tool_call>; a call whose
    arguments are not JSON is left in the text (the model did not make a well-formed call)."""
    start = tool_call_start(text)
    if start < 0:
        return text, []
    calls = []
    for name, args in _DEEPSEEK_CALL.findall(text, start):
        try:
            json.loads(args)
            calls.append((name.strip(), args.strip()))
        except json.JSONDecodeError:
            continue
    for obj in _HERMES_CALL.findall(text, start):
        try:
            call = json.loads(obj)
            name, args = call["name"], call.get("arguments", {})
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        calls.append((str(name), args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    if not calls:
        return text, []
    return text[:start].rstrip(), calls


class ToolCallSplitter:
    """Streamed answer text with tool calls held back: `feed` returns the text that is certainly
    not part of a call (a partial marker at the end waits), `finish` the rest of the text and the
    parsed calls, so the concatenated text equals `parse_tool_calls(whole)[0]`."""

    MARKERS = (TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, HERMES_OPEN)

    def __init__(self):
        self.buf = ""
        self.emitted = 0
        self.in_call = False

    def feed(self, text: str) -> str:
        self.buf += text
        if self.in_call:
            return ""
        start = tool_call_start(self.buf)
        if start >= 0:
            self.in_call = True
            end = len(self.buf[:start].rstrip())
        else:
            end = len(self.buf) - max(partial_suffix(self.buf, m) for m in self.MARKERS)
            end = min(end, len(self.buf[:end].rstrip()))  # whitespace before a call is dropped with it
        delta = self.buf[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def finish(self) -> tuple[str, list[tuple[str, str]]]:
        content, calls = parse_tool_calls(self.buf)
        rest = content[self.emitted:]
        self.emitted = len(content)
        return rest, calls

"""ComfyUI's prompt-weighting syntax, read as ComfyUI reads it (comfy/sd1_clip.py, for SD1/SDXL CLIP prompts):

- `(text)` multiplies the weight of `text` by 1.1 (nested: 1.1 per level);
- `(text:1.3)` sets the weight of `text` to 1.3 (absolute: it replaces the enclosing weight, it does not multiply
  it); a tail after the last `:` that is not a number leaves `(a:b)` as text `a:b` with weight x1.1;
- `\\(` and `\\)` are literal parentheses; an unbalanced parenthesis stays literal text;
- square brackets are plain text (ComfyUI has no `[text]` de-emphasis, unlike A1111).

The result is a list of (text, weight) segments; each segment is tokenized on its own, and a segment of fewer
than 8 tokens is never split across two 75-token chunks (see text.py)."""

from __future__ import annotations

# private-use stand-ins for escaped parentheses while the structure is parsed
_OPEN, _CLOSE = "\0\2", "\0\1"
EMPHASIS = 1.1


def _protect(text: str) -> str:
    return text.replace("\\)", _CLOSE).replace("\\(", _OPEN)


def _restore(text: str) -> str:
    return text.replace(_CLOSE, ")").replace(_OPEN, "(")


def _top_level_groups(text: str) -> list[str]:
    """Split `text` into plain runs and outermost "(...)" groups. ComfyUI's depth counter may go negative on a
    stray ")" -- everything after it then stays in one literal run; kept so that odd prompts read the same."""
    parts: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(" and depth == 0:
            if current:
                parts.append(current)
            current = "("
            depth = 1
        elif char == "(":
            current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                parts.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        parts.append(current)
    return parts


def _group_weight(inner: str, weight: float) -> tuple[str, float]:
    """The text and weight inside one "(...)": an explicit `:number` tail sets it, else x1.1."""
    colon = inner.rfind(":")
    if colon > 0:
        try:
            return inner[:colon], float(inner[colon + 1 :])
        except ValueError:
            pass
    return inner, weight * EMPHASIS


def _segments(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for part in _top_level_groups(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            out += _segments(*_group_weight(part[1:-1], weight))
        else:
            out.append((part, weight))
    return out


def parse_weights(prompt: str, weighted: bool = True) -> list[tuple[str, float]]:
    """(text, weight) segments of `prompt`, escapes resolved; `weighted=False` reads it all as text of weight 1."""
    protected = _protect(prompt)
    segments = _segments(protected, 1.0) if weighted else [(protected, 1.0)]
    return [(_restore(text), weight) for text, weight in segments]

"""AUTOMATIC1111's prompt language, parsed in plain Python (no torch).

The order in which a prompt is taken apart is A1111's:

1. ``<lora:name:weight>`` (and any other ``<type:...>`` extra-network tag) leaves the text
   (:func:`extract_extra_networks`);
2. ``AND`` splits it into weighted parts for composable diffusion (:func:`split_and`);
3. each part becomes a schedule of plain texts — prompt editing ``[from:to:when]`` and
   alternation ``[a|b]`` resolved per sampling step (:func:`prompt_schedule`);
4. each text becomes runs of (text, weight) with ``BREAK`` markers (:func:`parse_attention`),
   which the text encoder turns into weighted 75-token chunks (``engine/conditioning.py``).

Nothing here raises on odd input: text that is not valid syntax is taken literally, as A1111
does. Only a LoRA tag with a weight that is not a number is an error (A1111 fails the job).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# A marker in parse_attention's output: the current chunk ends here.
BREAK = ("BREAK", -1.0)


class PromptError(ValueError):
    """A prompt that cannot be honoured (e.g. a LoRA tag whose weight is not a number)."""


# ---------------------------------------------------------------------------- extra networks

@dataclass(frozen=True)
class LoraTag:
    name: str
    weight: float
    text: str  # the tag as written


# "[^<>]": a tag never spans another "<", so an unclosed "<a:" costs a scan to the next "<" only
# (with "[^>]" each of many unclosed tags scanned to the end: quadratic).
_EXTRA_NETWORK = re.compile(r"<(\w+):([^<>]+)>")
LORA_TAG_TYPES = ("lora", "lyco")  # "lyco" is the LyCORIS extension's spelling; A1111 treats it as lora


def extract_extra_networks(prompt: str) -> tuple[str, list[LoraTag], list[str]]:
    """The prompt without its ``<type:args>`` tags, the LoRA tags, and the other tags' text
    (A1111 removes every such tag from the text; types other than LoRA are not supported here)."""
    loras: list[LoraTag] = []
    others: list[str] = []

    def take(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2).split(":")
        if kind.lower() not in LORA_TAG_TYPES:
            others.append(m.group(0))
            return ""
        name = args[0].strip()
        if not name:
            raise PromptError(f"{m.group(0)}: the LoRA tag names no LoRA")
        if len(args) > 2:
            raise PromptError(f"{m.group(0)}: one weight per LoRA tag (<lora:name:weight>); separate "
                              "text-encoder and UNet weights are not supported")
        weight = 1.0
        if len(args) == 2:
            try:
                weight = float(args[1])
            except ValueError:
                raise PromptError(f"{m.group(0)}: the weight {args[1]!r} is not a number") from None
            if weight != weight or weight in (float("inf"), float("-inf")):
                raise PromptError(f"{m.group(0)}: the weight must be a finite number")
        loras.append(LoraTag(name, weight, m.group(0)))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), loras, others


# ---------------------------------------------------------------------------- AND

_AND = re.compile(r"\bAND\b")
_PART_NUMBER = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")


def _part_weight(part: str) -> tuple[str, str | None]:
    """A part's text and its trailing ``:weight`` (A1111's ``^(.*?)(?:\\s*:\\s*NUMBER)?\\s*$``),
    read backwards from the end in one pass (the regex was quadratic on long runs of spaces)."""
    end = len(part.rstrip())
    j = end
    while j > 0 and (part[j - 1].isdecimal() or part[j - 1] == "."):
        j -= 1
    digits_at = j
    if j > 0 and part[j - 1] in "+-":
        j -= 1
    k = j
    while k > 0 and part[k - 1].isspace():
        k -= 1
    if digits_at < end and k > 0 and part[k - 1] == ":" and _PART_NUMBER.fullmatch(part, j, end):
        return part[:k - 1].rstrip(), part[j:end]
    return part[:end], None


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable-diffusion parts: ``a cat :1.2 AND a dog`` -> [("a cat", 1.2), (" a dog", 1.0)]."""
    parts = []
    for part in _AND.split(prompt):
        text, weight = _part_weight(part)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


# ---------------------------------------------------------------------------- scheduling

@dataclass
class _Scheduled:
    before: list | None
    after: list
    when_text: str
    when: int = 0


@dataclass
class _Alternate:
    options: list


class _NoParse(Exception):
    pass


_NUMBER = re.compile(r"[+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+)")
_WHITESPACE = re.compile(r"\s*")
_PLAIN_STOP = set("\\[]():|")
_MAX_NESTING = 100
# How deep brackets may nest in a prompt (limits.py refuses deeper ones at submit): each level
# multiplies the weights it encloses, so 5,000 levels overflow to inf, and the weighting pass
# costs depth x length.
MAX_ATTENTION_NESTING = _MAX_NESTING


class _ScheduleParser:
    """Recursive descent over A1111's scheduling grammar: a prompt is text, ``(...)``,
    ``(...:...)``, ``[...]``, ``[from:to:when]``, ``[to:when]``, ``[a|b|...]``; at the top
    level (only) stray ``[ ] ( ) :`` are text. A ``|`` outside an alternation, or a trailing
    lone backslash, makes the whole prompt literal. Results are memoised per position, so
    unbalanced brackets cost linear time."""

    def __init__(self, text: str):
        self.s = text
        self.memo: dict[int, tuple | None] = {}

    def parse(self) -> list:
        s, i, out = self.s, 0, []
        while i < len(s):
            seq, i = self.prompt(i, 0)
            out.extend(seq)
            if i >= len(s):
                break
            if s[i] in "[]():":
                out.append(s[i])
                i += 1
            else:
                raise _NoParse()
        return out

    def prompt(self, i: int, depth: int) -> tuple[list, int]:
        s, out = self.s, []
        while i < len(s):
            c = s[i]
            if c in "([":
                got = self.construct(i, depth + 1)
                if got is None:
                    break
                node, i = got
                out.extend(node)
                continue
            if c in _PLAIN_STOP and c != "\\":
                break
            j = i
            while j < len(s):
                c = s[j]
                if c == "\\":
                    if j + 1 < len(s) and s[j + 1] != "\n":
                        j += 2
                        continue
                    break
                if c in _PLAIN_STOP:
                    break
                j += 1
            if j == i:
                break
            out.append(s[i:j])
            i = j
        return out, i

    def construct(self, i: int, depth: int):
        if i in self.memo:
            return self.memo[i]
        if depth > _MAX_NESTING:  # deeper than any real prompt: taken as text, and no deep recursion
            return None
        got = self._round(i, depth) if self.s[i] == "(" else self._square(i, depth)
        self.memo[i] = got
        return got

    def _at(self, i: int) -> str:
        return self.s[i] if i < len(self.s) else ""

    def _round(self, i: int, depth: int):
        first, j = self.prompt(i + 1, depth)
        if self._at(j) == ")":
            return ["(", *first, ")"], j + 1
        if self._at(j) == ":":
            second, k = self.prompt(j + 1, depth)
            if self._at(k) == ")":
                return ["(", *first, ":", *second, ")"], k + 1
        return None

    def _when(self, j: int):
        """``[WHITESPACE] NUMBER [WHITESPACE] "]"`` from j; (number text, index after ``]``)."""
        j = _WHITESPACE.match(self.s, j).end()
        m = _NUMBER.match(self.s, j)
        if not m:
            return None
        k = _WHITESPACE.match(self.s, m.end()).end()
        if self._at(k) != "]":
            return None
        return m.group(0), k + 1

    def _square(self, i: int, depth: int):
        first, j = self.prompt(i + 1, depth)
        c = self._at(j)
        if c == "]":
            return ["[", *first, "]"], j + 1
        if c == "|":
            options = [first]
            while self._at(j) == "|":
                option, j = self.prompt(j + 1, depth)
                options.append(option)
            if self._at(j) == "]":
                return [_Alternate(options)], j + 1
            return None
        if c == ":":
            when = self._when(j + 1)
            if when is not None:
                return [_Scheduled(None, first, when[0])], when[1]
            second, k = self.prompt(j + 1, depth)
            if self._at(k) == ":":
                when = self._when(k + 1)
                if when is not None:
                    return [_Scheduled(first, second, when[0])], when[1]
        return None


def _walk(seq: list, visit) -> None:
    for node in seq:
        if isinstance(node, _Scheduled):
            visit(node)
            if node.before:
                _walk(node.before, visit)
            _walk(node.after, visit)
        elif isinstance(node, _Alternate):
            visit(node)
            for option in node.options:
                _walk(option, visit)


def _render(seq: list, step: int) -> str:
    out = []
    for node in seq:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            if step <= node.when:
                out.append(_render(node.before, step) if node.before else "")
            else:
                out.append(_render(node.after, step))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """[(last step, text), ...] for a prompt with prompt editing and alternation, as A1111
    computes it (its current "new" timelines): ``when`` with a decimal point is a fraction
    of the steps, without one a step number. For a hires pass (``hires_steps`` given, ``steps``
    the first pass's), integers count on from the first pass and fractions from 1.0, so
    ``[a:b:1.5]`` switches halfway through the hires pass."""
    if hires_steps is None:
        int_offset, frac_offset, total = 0, 0.0, steps
    else:
        int_offset, frac_offset, total = steps, 1.0, hires_steps
    try:
        tree = _ScheduleParser(prompt).parse()
    except (_NoParse, RecursionError):
        return [(total, prompt)]
    boundaries = {total}

    def visit(node) -> None:
        if isinstance(node, _Alternate):
            boundaries.update(range(1, total + 1))
            return
        v = float(node.when_text)
        v = (v - frac_offset) * total if "." in node.when_text else v - int_offset
        node.when = min(total, int(v)) if v == v and abs(v) != float("inf") else (total if v > 0 else 0)
        if node.when >= 1:
            boundaries.add(node.when)

    _walk(tree, visit)
    return [(t, _render(tree, t)) for t in sorted(boundaries)]


# ---------------------------------------------------------------------------- attention

_BREAK_SPLIT = re.compile(r"\bBREAK\b")  # the spaces around it are stripped after the split (linear)
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Runs of (text, weight): ``(x)`` x1.1, ``[x]`` /1.1, ``(x:w)`` xw, nesting multiplies,
    ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal, unclosed brackets apply to the end,
    unmatched closers and malformed weights are text. ``BREAK`` yields the :data:`BREAK` marker;
    unlike A1111 a BREAK inside brackets is still a BREAK (A1111 would encode the word with
    a negative weight)."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for p in range(start, len(res)):
            if res[p][1] is not None:
                res[p][1] *= factor

    def add_text(chunk: str) -> None:
        pieces = _BREAK_SPLIT.split(chunk)
        for n, part in enumerate(pieces):
            if n:
                res.append(["BREAK", None])
                part = part.lstrip()
            if n < len(pieces) - 1:
                part = part.rstrip()
            res.append([part, 1.0])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1] if i + 1 < n else ""
            if nxt in ("(", ")", "[", "]", "\\"):
                res.append([nxt, 1.0])
                i += 2
            else:  # a lone backslash vanishes (A1111 appends its empty remainder)
                res.append(["", 1.0])
                i += 1
        elif c in "([" and len(round_open) + len(square_open) >= MAX_ATTENTION_NESTING:
            add_text(c)  # deeper than any real prompt (refused at submit): text, and linear time
            i += 1
        elif c == "(":
            round_open.append(len(res))
            i += 1
        elif c == "[":
            square_open.append(len(res))
            i += 1
        elif c == ":":
            m = _WEIGHT_CLOSE.match(text, i)
            weight = _number(m.group(1)) if m else None
            if m and round_open and weight is not None:
                multiply(round_open.pop(), weight)
                i = m.end()
            elif m and not round_open:
                add_text(m.group(0))  # a weight with no "(" open is text
                i = m.end()
            else:
                add_text(":")
                i += 1
        elif c == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
            i += 1
        elif c == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
            i += 1
        elif c in ")]":
            add_text(c)
            i += 1
        else:
            j = i
            while j < n and text[j] not in "\\()[]:":
                j += 1
            add_text(text[i:j])
            i = j
    for pos in round_open:
        multiply(pos, ROUND_MULTIPLIER)
    for pos in square_open:
        multiply(pos, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0]]
    merged: list[list] = []
    for text_, weight in res:
        if merged and merged[-1][1] == weight and weight is not None:
            merged[-1][0] += text_
        else:
            merged.append([text_, weight])
    return [BREAK if w is None else (t, w) for t, w in merged]


def _number(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:  # "1.2.3": A1111 fails the job; here the text stays text
        return None

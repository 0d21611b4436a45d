"""Guards against what instruction VLMs get wrong when they caption (transforms/caption.py).

Each check takes the decoded new text (and whether generation stopped at the token limit) and
returns a flag, a short name that is also a dead-letter kind (schemas/records.py):

- `empty`: nothing left after cleaning;
- `repetition loop`: an n-gram repeated back to back past a limit ("a man a man a man ..."),
  or a long text made of few distinct words;
- `echo`: the instruction or the chat template came back (role names, "USER:", the prompt);
- `refusal`: a refusal or a meta-answer ("I'm sorry, I can't", "As an AI", "I cannot see");
- `cut at the token limit`: generation ran to --caption-max-new-tokens without ending.

A preamble ("The image shows ...", "This is a photo of ...") is not a fault: it is trimmed.
With `--caption-on-bad drop` a flagged caption dead-letters its sample (kind per flag, the raw
text in the reason); with `keep` the sample is written with `caption_flags` in its JSON.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from prep.schemas.contract import CAPTION_FLAGS

# The flags as the shard contract names them (KEY.json caption_flags).
FLAGS = CAPTION_FLAGS
EMPTY, REPETITION, ECHO, REFUSAL, CUT = CAPTION_FLAGS

# Back-to-back repeats that make a loop: a word 4 times, a 2-4 word phrase 3 times.
REPEAT_LIMITS = {1: 4, 2: 3, 3: 3, 4: 3}
# A text of at least this many words with fewer than this share distinct is a loop too.
MIN_WORDS_FOR_RATIO, MIN_DISTINCT_RATIO = 16, 0.3

_WORD = re.compile(r"[\w']+")
_PREAMBLE = re.compile(
    r"^(?:(?:in|on) (?:this|the) (?:image|photo|photograph|picture)\s*,?\s*(?:we (?:can )?see|there is|there are)?"
    r"|(?:the|this) (?:image|photo|photograph|picture|scene) (?:shows|depicts|features|contains|displays|presents"
    r"|is (?:of|a photo of|a picture of|an image of))"
    r"|this is (?:a|an) (?:photo|photograph|picture|image|close-up|portrait) of"
    r"|(?:here|it) is (?:a|an) (?:photo|photograph|picture|image) of)\s*:?\s*",
    re.IGNORECASE,
)
_REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|i can(?:no|')t (?:help|assist|provide|describe|identify|see|view|tell)"
    r"|i cannot|i am (?:unable|not able)|i'?m (?:unable|not able)|as an ai|as a language model"
    r"|unable to (?:see|view|determine|identify|describe)|there is no image|no image (?:was|is) (?:provided|attached)"
    r"|i do not have the ability|i don'?t have the ability)\b",
    re.IGNORECASE,
)
_ROLE_ECHO = re.compile(r"(?:^|\s)(?:user|assistant|system|human|gpt)\s*:|<\|?im_(?:start|end)\|?>|<image>"
                        r"|<\|[a-z_]+\|>|\bend_of_utterance\b", re.IGNORECASE)


@dataclass(frozen=True)
class Checked:
    """A caption after the guards: the text to keep (preamble trimmed) and its flags."""

    text: str
    flags: tuple[str, ...]
    raw: str


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


def trim_preamble(text: str) -> str:
    """"The image shows a woman smiling." -> "a woman smiling." (once, at the start)."""
    trimmed = _PREAMBLE.sub("", text, count=1)
    return trimmed if trimmed.strip() else text


def repetition_loop(text: str) -> bool:
    words = [w.lower() for w in _WORD.findall(text)]
    for n, limit in REPEAT_LIMITS.items():
        for start in range(len(words) - n * limit + 1):
            gram = words[start:start + n]
            if all(words[start + k * n:start + (k + 1) * n] == gram for k in range(1, limit)):
                return True
    return len(words) >= MIN_WORDS_FOR_RATIO and len(set(words)) / len(words) < MIN_DISTINCT_RATIO


def echoes(text: str, instruction: Optional[str]) -> bool:
    if _ROLE_ECHO.search(text):
        return True
    if instruction:
        wanted = _norm(instruction).lower().rstrip(".?!:")
        return len(wanted) >= 8 and wanted in _norm(text).lower()
    return False


def check(raw: str, *, instruction: Optional[str] = None, cut: bool = False) -> Checked:
    """The guards on one decoded caption (see the module docstring)."""
    text = _norm(raw)
    flags = []
    if text and echoes(text, instruction):
        flags.append(ECHO)
    if text and _REFUSAL.search(text):
        flags.append(REFUSAL)
    text = trim_preamble(text)
    if text and repetition_loop(text):
        flags.append(REPETITION)
    if cut:
        flags.append(CUT)
    if not text:
        flags.insert(0, EMPTY)
    return Checked(text=text, flags=tuple(flags), raw=raw)

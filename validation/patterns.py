"""What bad content looks like: one copy, shared by curate (drops bad generated turns) and the
Great Expectations suites (report bad rows). Plain Python: importing this never loads GX.
"""

from __future__ import annotations

import re
import unicodedata

# Boilerplate that small instruct models emit instead of an answer. Case-insensitive.
REFUSAL_PATTERNS = (
    r"(?i)\bas an ai(?: language)? model\b",
    r"(?i)\bas a large language model\b",
    r"(?i)\bi(?:'m| am) (?:just )?an ai\b",
    r"(?i)\bi(?:'m| am) sorry,? but i (?:cannot|can't|can not|am unable to)\b",
    r"(?i)\bi (?:cannot|can't) (?:assist|help) with (?:that|this)\b",
    r"(?i)\bmy (?:training data|knowledge cutoff)\b",
)

# Chat-template syntax that must never appear inside a message's content: it means a row was
# rendered twice or an import was not converted (Llama/Mistral, ChatML, Llama 3, Gemma, Phi).
TEMPLATE_MARKERS = (
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "<|user|>",
    "<|assistant|>", "<|system|>", "<|end|>",
)
TEMPLATE_MARKER_PATTERN = "|".join(re.escape(m) for m in TEMPLATE_MARKERS)

# Every refusal pattern contains one of these (lowercase): a cheap `in` test first, since a
# case-insensitive regex over every answer costs more than the rest of the checks together.
REFUSAL_ANCHORS = ("an ai", "language model", "sorry", "assist with", "help with",
                   "training data", "knowledge cutoff")

# An answer that stops mid-sentence: its last visible character is not one that ends a sentence,
# a list item, a code block or a quote.
TERMINATORS = ".!?:;)]}`\"'*>…。！？_|-"

_REFUSAL_RE = re.compile("|".join(f"(?:{p[4:]})" for p in REFUSAL_PATTERNS), re.IGNORECASE)
_MARKER_RE = re.compile(TEMPLATE_MARKER_PATTERN)

# Words that carry no meaning for "is this the same question?".
_STOPWORDS = (
    "a an the i me my we our you your it its is are was be been do does did can could should "
    "would will shall may might must how what which who whom why when where there here this that "
    "these those to of in on at for from with by about as and or if then so into than please "
    "between s"
)
STOPWORDS = frozenset(_STOPWORDS.split())


def is_refusal(text: str) -> bool:
    low = text.lower()
    # Spelled out rather than any(...) over REFUSAL_ANCHORS: this runs on every message.
    hit = ("an ai" in low or "language model" in low or "sorry" in low or "assist with" in low
           or "help with" in low or "training data" in low or "knowledge cutoff" in low)
    return hit and _REFUSAL_RE.search(text) is not None


def template_marker(text: str) -> str | None:
    """The first chat-template marker inside `text`, or None."""
    match = _MARKER_RE.search(text)
    return match.group(0) if match else None


def last_char(text: str) -> str | None:
    """The last visible character, None for blank text."""
    return text.rstrip()[-1:] or None


def is_terminated(text: str) -> bool:
    char = last_char(text)
    return char is not None and char in TERMINATORS


def question_key(text: str) -> str:
    """Exact-duplicate key: case, accents, punctuation and spacing do not make a new question."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def content_words(text: str) -> str:
    """The question without filler words, singularised: the near-duplicate comparison text."""
    words = [w for w in question_key(text).split() if w not in STOPWORDS]
    return " ".join(w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words)


_WORD_RE = re.compile(r"\w+")


def _content_word_iter(text: str):
    """content_words one at a time (duplicates included), lazily."""
    for match in _WORD_RE.finditer(unicodedata.normalize("NFKC", text).casefold()):
        word = match.group()
        if word not in STOPWORDS:
            yield word[:-1] if len(word) > 3 and word.endswith("s") else word


def restates(question: str, answer: str) -> bool:
    """The answer only repeats its question ("How do I list tables?" -> "You list tables."):
    it has words, and none of them is new (case, filler words and plurals aside). Runs on
    every answer: stops at the first new word, which real answers reach within a few words."""
    asked_text = unicodedata.normalize("NFKC", question).casefold()
    asked: set[str] | None = None
    said = False
    for word in _content_word_iter(answer):
        if word not in asked_text:  # not even a substring: a new word (the cheap, common exit)
            return False
        asked = asked if asked is not None else set(_content_word_iter(question))
        if word not in asked:
            return False
        said = True
    return said

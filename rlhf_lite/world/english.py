"""Ordinary English -> the world's token style, so the gold judge can read a real model's answers.

World text is lower case with every token, punctuation included, separated by one space
(``" 3 plus 8 is 11 ."``); a pretrained instruct model writes ``"3 + 8 = 11."``. :func:`normalize_response`
maps the second onto the first. It is the identity on world text twice over: text made only of world
tokens (the world's vocabulary and the two turn markers, i.e. everything the world's data and the tiny
model can produce) is returned as it is, and every rule below matches only what world text never holds
(capitals, apostrophes, symbols, punctuation attached to a word, words outside the world vocabulary).
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["is_world_text", "normalize_response"]

_CHARS = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2212": "-",
                        "\u2013": "-", "\u2014": " , ", "\u2026": "...", "\u00d7": " times ", "\u2022": "-"})
# Before lower-casing, on the raw text. The world has no multiplication: "times" is a word it never uses,
# so "3 * 4" can match no answer frame.
_SYMBOLS: tuple[tuple[str, str], ...] = (
    (r"(?m)^\s*(?:[-*+]|#+)\s+", " "),           # list bullets and markdown headers at a line start
    (r"(?<=\d)\s*\*\s*(?=\d)", " times "),        # "3 * 4", before "*" is read as emphasis
    (r"(?<=\d)\s*-\s*(?=\d)", " minus "),         # "7 - 2", "7-2"; hyphenated words keep their "-"
    (r"\+", " plus "),
    (r"=+", " is "),
    (r"[*`~]+|(?<!\w)_+|_+(?!\w)", " "),          # markdown emphasis and code marks
    (r"[()\[\]{}\"<>]", " "),                     # brackets and double quotes
)
# On the lower-cased text, apostrophes straightened. Each source word is outside the world vocabulary.
_WORDS: tuple[tuple[str, str], ...] = (
    (r"\bcan't\b|\bcannot\b", "can not"), (r"\bwon't\b", "will not"), (r"\bshan't\b", "shall not"),
    (r"\bain't\b", "is not"), (r"n't\b", " not"), (r"\bi'm\b", "i am"), (r"\blet's\b", "let us"),
    (r"\b(it|that|what|here|there|he|she|who|where|this)'s\b", r"\1 is"), (r"'re\b", " are"),
    (r"'ve\b", " have"), (r"'ll\b", " will"), (r"'d\b", " would"), (r"'s\b", ""),  # "zorb's" -> "zorb"
    (r"\b(?:am|are|is)\s+(?:unable|not\s+able)\s+to\b", "can not"),  # "i am unable to assist" -> "i can not assist"
    (r"\b(?:is )?equal to\b|\bequals(?: to)?\b", "is"),
    (r"\bis:(?=\s|$)", "is"),                     # "the answer is: 11" (world text never attaches a ":")
    (r"(?<=\d),\s*(?:and\s+)?(?=\d)", " "),       # counting lists: "3, 4, 5, and 6" -> "3 4 5 6"
)
_SENTENCE_END = {"!": ".", ";": ".", "...": "."}
_EDGE_PUNCT = re.compile(r"^(?P<lead>[.,?!:;']*)(?P<core>.*?)(?P<trail>[.,?!:;']*)$")
_MARKERS = ("Human:", "Assistant:")  # the turn markers are tokens of the tiny model's tokenizer too


@lru_cache(maxsize=1)
def _world_tokens() -> frozenset[str]:
    from .writer import world_vocabulary  # local import: the writer imports the judge, which imports this

    return frozenset(world_vocabulary()) | frozenset(_MARKERS)


def is_world_text(text: str) -> bool:
    """Whether every whitespace token of ``text`` is a world token (then the judge reads it unchanged)."""
    tokens = _world_tokens()
    return all(t in tokens for t in text.split())


def _split_token(token: str) -> list[str]:
    """Split punctuation off the ends of one token ("11." -> "11", "."); "!", ";" and "..." end a sentence."""
    m = _EDGE_PUNCT.match(token)
    assert m is not None  # the pattern matches every string
    out: list[str] = []
    for part, is_punct in ((m["lead"], True), (m["core"], False), (m["trail"], True)):
        if not is_punct:
            out.extend([part] if part else [])
            continue
        for p in re.findall(r"\.\.\.|[.,?!:;]", part):  # quotes at the edges are dropped
            p = _SENTENCE_END.get(p, p)
            if not (out and out[-1] == p and p in (".", ",")):  # "!!!" is one sentence end, not three
                out.append(p)
    return out


def _english_to_world(text: str) -> str:
    """The normalisation rules themselves (see :func:`normalize_response`), without the world-text check."""
    text = text.translate(_CHARS)
    for pattern, repl in _SYMBOLS:
        text = re.sub(pattern, repl, text)
    text = text.lower()
    for pattern, repl in _WORDS:
        text = re.sub(pattern, repl, text)
    words = [p for t in text.split() for p in _split_token(t)]
    return " " + " ".join(words) if words else ""


def normalize_response(text: str) -> str:
    """Map a response in ordinary English to the world's token style; the identity on world text.

    Lower-cases; splits ".", ",", "?", "!", ":", ";" off words ("!", ";" and "..." become "."); expands
    contractions ("can't" / "cannot" -> "can not", "won't" -> "will not", "i'm" -> "i am", "it's" ->
    "it is", "don't" -> "do not"; a possessive "'s" is dropped), "am unable to" / "am not able to" -> "can
    not"; reads arithmetic ("+" -> "plus", "-" or
    "−" between numbers -> "minus", "=", "equals", "is equal to", "is:" -> "is", "*" / "×" between numbers ->
    "times"); drops markdown marks, list bullets, brackets and quotes, and the commas (and a final "and")
    of number lists; collapses whitespace and newlines. The result has single spaces and a leading one,
    like a world response (an empty response gives ""): ``"3 + 8 = 11!"`` -> ``" 3 plus 8 is 11 ."``.
    """
    if is_world_text(text):
        words = text.split()
        return " " + " ".join(words) if words else ""
    return _english_to_world(text)

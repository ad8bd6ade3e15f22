"""Text cleaning: the original pipeline's steps, minus its two defects.

Deviations from the original (each covered by a test):
- content values are joined with a paragraph break (the original glued words together) and
  `None` or non-text values are skipped (the original crashed on them);
- non-ASCII letters are kept: text is Unicode-normalised (NFKC) instead of having every
  non-ASCII character dropped, so "café", "Straße" and "数据" survive;
- more emoji are removed: the original's ranges missed newer blocks (🤔, 🧪), symbols and
  dingbats (✅, ⭐) and the joiners inside emoji sequences;
- the gaps left by removed emojis are tidied: runs of spaces inside a line become one space
  and trailing spaces go (leading indentation, which code needs, is kept).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

PARAGRAPH_BREAK = "\n\n"

# Mathematical sans-serif bold / italic blocks used by LinkedIn "fancy text" generators.
_BOLD_UPPER, _BOLD_LOWER = 0x1D5D4, 0x1D5EE
_BOLD_DIGITS = 0x1D7CE  # the five digit styles U+1D7CE..U+1D7FF, ten digits each
_ITALIC_UPPER, _ITALIC_LOWER = 0x1D608, 0x1D622

_UNBOLD = {
    **{_BOLD_UPPER + i: ord("A") + i for i in range(26)},
    **{_BOLD_LOWER + i: ord("a") + i for i in range(26)},
    **{_BOLD_DIGITS + i: ord("0") + i % 10 for i in range(50)},
}
_UNITALIC = {
    **{_ITALIC_UPPER + i: ord("A") + i for i in range(26)},
    **{_ITALIC_LOWER + i: ord("a") + i for i in range(26)},
}
_EMOJI_AND_ARROWS = re.compile(
    "[\U0001f600-\U0001f64f\U0001f300-\U0001f5ff\U0001f680-\U0001f6ff\U0001f1e0-\U0001f1ff"
    "\u2192\u2193\u21b3"
    # Beyond the original's ranges: newer emoji blocks (🤔 🧪), symbols and dingbats (✅ ⭐),
    # and the joiners/selectors that glue emoji sequences (1️⃣ keeps its digit).
    "\U0001f900-\U0001f9ff\U0001fa70-\U0001faff\u2600-\u27bf\u2b50-\u2b55"
    "\ufe0f\u20e3\u200d]+"
)
_URL = re.compile(r"https?://\S+|www\.\S+")
# Control characters other than tab and newline (NFKC leaves them in place).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}")
_TRAILING_SPACES = re.compile(r"[ \t]+$", re.MULTILINE)


def join_content(values: Iterable[Any]) -> str:
    """Join the text values of a content dict with paragraph breaks, skipping non-text."""
    return PARAGRAPH_BREAK.join(v.strip() for v in values if isinstance(v, str) and v.strip())


def unbold(text: str) -> str:
    return text.translate(_UNBOLD)


def unitalic(text: str) -> str:
    return text.translate(_UNITALIC)


def remove_emojis_and_arrows(text: str) -> str:
    return _EMOJI_AND_ARROWS.sub(" ", text)


def normalize_unicode(text: str) -> str:
    """NFKC instead of the original's `clean_non_ascii_chars`: accents and scripts survive."""
    return _CONTROL.sub("", unicodedata.normalize("NFKC", text))


def replace_urls(text: str) -> str:
    return _URL.sub("[URL]", text)


def tidy_spaces(text: str) -> str:
    return _TRAILING_SPACES.sub("", _INNER_SPACES.sub(" ", text))


def clean_text(text: str) -> str:
    """The original's chain of steps, in its order, newlines kept."""
    # Imported here: `unstructured` takes 0.3 s to import, which every command would pay.
    from unstructured.cleaners.core import clean, replace_unicode_quotes

    text = unbold(text)
    text = unitalic(text)
    text = remove_emojis_and_arrows(text)
    text = clean(text)
    text = replace_unicode_quotes(text)
    text = normalize_unicode(text)
    text = replace_urls(text)
    return tidy_spaces(text)


def clean_content(content: Mapping[str, Any]) -> str:
    return clean_text(join_content(content.values()))


def clean_repository_content(content: Mapping[str, Any]) -> str:
    """Code files keep their path as a header line, so a chunk says which file it came from."""
    files = (
        f"{path}\n{text}"
        for path, text in sorted(content.items())
        if isinstance(text, str) and text.strip()
    )
    return clean_text(join_content(files))

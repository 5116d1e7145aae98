"""The one content rule genq enforces itself, whatever the caller decided (defence in depth).

A prompt that sexualises minors is refused before any model runs: the text names a minor (an
explicit age under 18, or a word denoting a child) AND a sexual term. Everything else about content
is the edge functions' decision. Settings can add terms (stricter); nothing switches the rule off.
See docs/POLICY.md for the rule set and its tests in tests/test_policy.py.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import PolicyViolation

MINOR_TERMS = (
    "child", "children", "childlike", "kid", "kids", "minor", "minors", "underage", "under-age",
    "preteen", "pre-teen", "preteens", "tween", "tweens", "toddler", "toddlers", "infant", "infants",
    "schoolgirl", "schoolgirls", "schoolboy", "schoolboys", "young teen", "young teens", "early teen",
    "loli", "lolita", "lolicon", "shota", "shotacon", "jailbait", "little girl", "little girls",
    "little boy", "little boys", "elementary school", "middle school", "middle schooler", "kindergarten",
    "prepubescent", "pubescent", "cp",
)
SEXUAL_TERMS = (
    "sex", "sexy", "sexual", "sexualized", "sexualised", "nude", "nudes", "naked", "nudity", "porn",
    "porno", "pornographic", "explicit", "nsfw", "erotic", "erotica", "topless", "bottomless",
    "lingerie", "undressed", "undressing", "undress", "stripping", "striptease", "genitals",
    "genitalia", "penis", "vagina", "pussy", "breasts", "boobs", "nipples", "intercourse", "orgasm",
    "masturbate", "masturbating", "masturbation", "fetish", "seductive", "seduce", "seducing", "aroused",
    "arousal", "hentai", "lewd", "bdsm", "bondage", "spread legs", "cum", "blowjob", "rape",
)
# "12 year old", "12-year-old", "12yo", "12 y/o", "aged 12", "age 12", "12 years of age"
_AGE = re.compile(
    r"\b(?P<n1>\d{1,2})\s*-?\s*(?:years?|yrs?|y\.?o\.?|y/o)(?:\s*-?\s*old|\s+of\s+age)?\b"
    r"|\bage(?:d)?\s*(?:of\s*)?(?P<n2>\d{1,2})\b",
    re.IGNORECASE,
)


def _pattern(terms: Iterable[str]) -> re.Pattern[str]:
    words = sorted({t.strip().lower() for t in terms if t.strip()}, key=len, reverse=True)
    body = "|".join(re.escape(w).replace(r"\ ", r"[\s_-]+") for w in words)
    return re.compile(rf"(?<![a-z0-9])(?:{body})(?![a-z0-9])", re.IGNORECASE)


_BUILTIN_MINOR = _pattern(MINOR_TERMS)
_BUILTIN_SEXUAL = _pattern(SEXUAL_TERMS)


def mentions_minor_age(text: str) -> bool:
    for match in _AGE.finditer(text):
        age = int(match.group("n1") or match.group("n2"))
        if age < 18:
            return True
    return False


class ContentRule:
    def __init__(self, extra_minor_terms: Iterable[str] = (), extra_sexual_terms: Iterable[str] = ()):
        extra_minor, extra_sexual = list(extra_minor_terms), list(extra_sexual_terms)
        self._minor = _pattern(MINOR_TERMS + tuple(extra_minor)) if extra_minor else _BUILTIN_MINOR
        self._sexual = _pattern(SEXUAL_TERMS + tuple(extra_sexual)) if extra_sexual else _BUILTIN_SEXUAL

    @classmethod
    def from_settings(cls, settings) -> "ContentRule":
        return cls(settings.policy_extra_minor_terms, settings.policy_extra_sexual_terms)

    def violates(self, text: str) -> bool:
        if not text or not self._sexual.search(text):
            return False
        return bool(self._minor.search(text)) or mentions_minor_age(text)

    def check(self, text: str, field: str) -> None:
        if self.violates(text):
            raise PolicyViolation(field, "refused: the request sexualises minors")

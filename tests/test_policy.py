"""The content rule: minors + sexual terms are refused; each alone is not; settings only tighten it."""
import pytest

from schemas.errors import PolicyViolation
from schemas.policy import ContentRule

REFUSED = [
    "a nude 15 year old", "naked child on a bed", "sexy schoolgirl", "aged 16, topless",
    "explicit photo of a little-girl", "NSFW 12yo", "erotic art of a preteen", "lingerie, 17-year-old",
    "underage porn", "a kid undressing", "loli hentai",
]
ALLOWED = [
    "portrait of a woman in a sunlit garden", "a 25-year-old model in lingerie", "kids playing in a park",
    "a child reading a book", "1990s nude figure study", "a knight standing on a cliff at dusk",
    "18 year old college student, topless on the beach", "sexy sports car", "children's birthday party",
]


@pytest.mark.parametrize("text", REFUSED)
def test_refused(text):
    with pytest.raises(PolicyViolation) as info:
        ContentRule().check(text, "prompt")
    assert info.value.field == "prompt" and info.value.reason == "policy_violation"


@pytest.mark.parametrize("text", ALLOWED)
def test_allowed(text):
    ContentRule().check(text, "prompt")


def test_extra_terms_make_it_stricter_and_builtins_stay():
    rule = ContentRule(extra_minor_terms=["youngster"], extra_sexual_terms=["steamy"])
    assert rule.violates("a steamy youngster") and rule.violates("naked child")
    assert not ContentRule().violates("a steamy youngster")


def test_settings_cannot_switch_it_off(monkeypatch):
    from schemas.settings import Settings
    monkeypatch.setenv("GENQ_POLICY_EXTRA_MINOR_TERMS", "[]")
    assert ContentRule.from_settings(Settings()).violates("naked child")

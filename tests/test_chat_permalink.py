"""The chat page's permalink carries its interventions' conditions as the steering page's does (one `when`
per intervention, aligned, only when some are conditional), and the page's form reads them back to the
same request."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from app.live.gateway import chat_permalink
from app.live.pages import _form_interventions
from app.live.schemas import ChatMessage, ChatRequest, InterventionModel
from sae_core.live.errors import LiveError

MESSAGES = [ChatMessage(role="system", content="be brief & kind"), ChatMessage(role="user", content="the king said?")]


def reopened(link: str) -> ChatRequest:
    """The request the chat page sends for a permalink: its query fills the form, the form posts its fields."""
    url = urlsplit(link)
    q = parse_qs(url.query, keep_blank_values=True)
    sae = url.path.removeprefix("/saes/").removesuffix("/chat").replace("%20", " ")
    return ChatRequest(
        sae=sae,
        messages=[ChatMessage(role="system", content=q["system"][0]), ChatMessage(role="user", content=q["user"][0])],
        interventions=_form_interventions(q.get("feature", []), q.get("mode", []), q.get("value", []), q.get("when", [])),
        max_new_tokens=int(q["max_new_tokens"][0]),
        temperature=float(q["temperature"][0]),
        top_p=float(q["top_p"][0]),
        seed=int(q["seed"][0]),
    )


def test_chat_permalink_round_trips_conditions():
    interventions = [
        InterventionModel(feature=3, mode="add", value=40, condition="gen"),
        InterventionModel(feature=5, mode="clamp", value=0),
        InterventionModel(feature=7, mode="cap", value=1.5, condition="other-sae:12>2.5"),
        InterventionModel(feature=9, mode="scale", value=-2, condition="prompt"),
        InterventionModel(feature=11, mode="ortho", value=0.5, condition="4>-0.25"),
    ]
    body = ChatRequest(sae="my sae", messages=MESSAGES, interventions=interventions, max_new_tokens=24, temperature=0.7, seed=3)
    link = chat_permalink(body)
    assert link.startswith("/saes/my%20sae/chat?system=be+brief+%26+kind&user=the+king+said%3F&feature=3&mode=add&value=40&when=gen")
    assert parse_qs(urlsplit(link).query, keep_blank_values=True)["when"] == ["gen", "", "other-sae:12>2.5", "prompt", "4>-0.25"]
    back = reopened(link)
    assert back == body
    assert chat_permalink(back) == link


def test_a_condition_comes_back_in_its_canonical_spelling_and_plain_links_have_no_when():
    body = ChatRequest(sae="s", messages=MESSAGES, interventions=[InterventionModel(feature=3, mode="add", value=4, condition="5 > 0.50")])
    link = chat_permalink(body)
    assert "when=5%3E0.5" in link  # as the steering permalink spells it (Condition.spec)
    assert reopened(link).interventions == [InterventionModel(feature=3, mode="add", value=4, condition="5>0.5")]
    plain = ChatRequest(sae="s", messages=MESSAGES, interventions=[InterventionModel(feature=3, mode="add", value=4)])
    assert "when" not in chat_permalink(plain)  # the links made before conditions are unchanged
    assert reopened(chat_permalink(plain)) == plain


def test_a_bad_condition_in_the_form_is_refused_with_its_reason():
    with pytest.raises(LiveError, match="intervention 1: condition"):
        _form_interventions(["3"], ["add"], ["1"], ["sometimes"])

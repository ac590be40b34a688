"""Conditional interventions, the new modes and frozen attention through the API and the steering page
(the runtime's own tests are J1's tests/test_steer*.py and test_sweep.py): a condition that never holds
leaves the steered text the default one, the frozen-attention run comes back beside the normal steered
run and in the permalink, a bad condition is a 422 with the reason."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from test_live_api import LIMITS, wait_ready

from app.main import create_app

BASE = {"sae": "tiny-sae", "prompt": "the cat sat on the", "max_new_tokens": 16}


@pytest.fixture(scope="module")
def live(mined_store):
    with TestClient(create_app(mined_store, live_config=LIMITS)) as client:
        wait_ready(client)
        yield client


def test_a_condition_that_never_holds_changes_nothing_and_is_in_the_permalink(live):
    conditional = [{"feature": 3, "mode": "add", "value": 40, "condition": "5>100000"}]
    never = live.post("/api/v1/steer", json={**BASE, "interventions": conditional})
    assert never.status_code == 200, never.text
    never = never.json()
    assert never["steered"]["token_ids"] == never["default"]["token_ids"] and never["diverges_at"] is None
    assert "when=5%3E100000" in never["permalink"]
    always = live.post("/api/v1/steer", json={**BASE, "interventions": [{"feature": 3, "mode": "add", "value": 40}]}).json()
    assert always["steered"]["token_ids"] != always["default"]["token_ids"]


def test_frozen_attention_comes_back_beside_the_steered_run_on_the_api_and_the_page(live):
    body = {**BASE, "interventions": [{"feature": 3, "mode": "add", "value": 40}], "frozen_attention": True}
    r = live.post("/api/v1/steer", json=body).json()
    assert r["frozen"] is not None and r["frozen"]["tokens"] and r["permalink"].endswith("&frozen=1")
    page = live.get(r["permalink"])
    assert page.status_code == 200 and 'name="frozen" value="1" checked' in page.text
    form = {"prompt": BASE["prompt"], "feature": "3", "mode": "add", "value": "40", "when": "", "frozen": "1", "max_new_tokens": "16"}
    fragment = live.post("/saes/tiny-sae/steer/result", data=form).text
    assert 'id="steer-frozen"' in fragment and 'id="steer-steered"' in fragment and "attention frozen" in fragment


@pytest.mark.parametrize("mode", ["cap", "ortho"])
def test_the_new_modes_are_accepted_by_the_api(live, mode):
    r = live.post("/api/v1/steer", json={**BASE, "interventions": [{"feature": 3, "mode": mode, "value": 1}]})
    assert r.status_code == 200, r.text


def test_a_bad_condition_is_a_422_with_the_reason(live):
    r = live.post("/api/v1/steer", json={**BASE, "interventions": [{"feature": 3, "mode": "add", "value": 1, "condition": "sometimes"}]})
    assert r.status_code == 422 and "condition" in r.text and "pattern" in r.text, r.text  # the field and the reason

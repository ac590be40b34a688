"""Strength sweeps on the tiny Llama (float32) and its tiny SAE: a sweep's points are the single steering runs
at those strengths (batching with left padding changes nothing beyond floating-point order: in float32 the
same greedy tokens, row for row, as LiveRuntime.generate and as one-row batches), and the cost measures mean
what they say (fluency recomputed by hand to 1e-4 relative)."""

from __future__ import annotations

import math

import pytest
import torch

from sae_core.config import GenerationConfig, LiveConfig
from sae_core.interchange import load_sae
from sae_core.live.errors import LiveError
from sae_core.live.interventions import Condition, Intervention
from sae_core.live.runtime import LiveRuntime
from sae_core.live.sweep import SweepPoint, SweepRequest, suggest, sweep_permalink
from sae_core.store.weights import RunSAE

PROMPTS = ("the cat sat over the house and", "then the king said", "a blue tree", "the whale ran under the big red")
TEXT = "The cat sat over the big red house. Then the king said that the whale ran under a blue tree."


@pytest.fixture(scope="module")
def runtime(tiny_lm, tiny_sae_dir):
    loaded = load_sae(tiny_sae_dir)
    run = RunSAE("tiny", 1, tiny_lm.name, "blocks.1.hook_resid_post", loaded.sae.cfg.n_latents, str(tiny_sae_dir))
    return LiveRuntime(LiveConfig(max_new_tokens_limit=64), lm=tiny_lm, sae_source=lambda name: (run, loaded))


@pytest.fixture(scope="module")
def feature(runtime):
    held = runtime.sae("tiny")
    ids = runtime.lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    z = held.loaded.sae.encode(runtime.lm.residuals(torch.tensor([ids]), held.layer)[0].float())
    return int(z[1:].amax(0).argmax())


@pytest.mark.parametrize("condition", [None, Condition("generated")], ids=["always", "gen-only"])
def test_a_sweeps_points_are_the_single_steering_runs(runtime, feature, condition):
    strengths = (0.0, 20.0, 80.0)
    request = SweepRequest("tiny", Intervention(feature, "add", 1.0, condition), strengths, PROMPTS, (), max_new_tokens=12, batch_rows=5)
    seen = []
    result = runtime.sweep(request, progress=seen.append)
    assert [p.strength for p in result.points] == list(strengths) and result.baseline.strength is None
    settings = GenerationConfig(max_new_tokens=12)
    for point in result.points:
        for prompt, ids in zip(PROMPTS, point.token_ids):
            single = runtime.generate("tiny", prompt, [Intervention(feature, "add", point.strength, condition)], settings)
            assert ids == single.steered.token_ids, (point.strength, prompt)
    for prompt, ids in zip(PROMPTS, result.baseline.token_ids):
        assert ids == runtime.generate("tiny", prompt, [], settings).default.token_ids
    # the same sweep one prompt at a time (batches of one row, no padding): the same metrics up to float order
    for prompt_i, prompt in enumerate(PROMPTS[:2]):
        one = runtime.sweep(SweepRequest("tiny", request.intervention, strengths, (prompt,), (), max_new_tokens=12, batch_rows=1))
        for a, b in zip(one.points, result.points):
            assert a.token_ids[0] == b.token_ids[prompt_i]
    assert seen and seen[-1].done == seen[-1].total and [s.stage for s in seen][0] == "baseline"


def test_metrics_mean_what_they_say(runtime, feature):
    request = SweepRequest("tiny", Intervention(feature, "add", 1.0), (0.0, 200.0), PROMPTS, (), max_new_tokens=10, batch_rows=64)
    result = runtime.sweep(request)
    zero, strong = result.points
    base = result.baseline
    # adding 0 is the unsteered model up to float order: KL ~ 0, the same text, the same fluency cost
    assert zero.token_ids == base.token_ids
    assert abs(zero.kl) < 1e-4 and abs(base.kl) < 1e-4
    assert zero.fluency == pytest.approx(base.fluency, rel=1e-4) and zero.lift == pytest.approx(base.lift, rel=1e-4, abs=1e-5)
    # a strong push costs: KL and the unsteered model's loss on the steered text rise
    assert strong.kl > 100 * max(abs(zero.kl), 1e-6) and strong.fluency > base.fluency + 0.5
    # fluency is the unsteered model's mean loss on the steered tokens: recompute one row by hand
    lm = runtime.lm
    ids = lm.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    gen = strong.token_ids[0]
    logits = lm.model(input_ids=torch.tensor([ids + gen]), use_cache=False).logits[0].float()
    lp = torch.log_softmax(logits[len(ids) - 1 : -1], -1)
    nll = -lp.gather(1, torch.tensor(gen)[:, None]).mean()
    one = runtime.sweep(SweepRequest("tiny", request.intervention, (200.0,), (PROMPTS[0],), (), max_new_tokens=10))
    assert one.points[0].fluency == pytest.approx(float(nll), rel=1e-4)


def test_the_suggestion_is_the_highest_lift_within_the_cost_and_is_checked_on_held_out_prompts(runtime, feature):
    base = SweepPoint(None, lift=0.1, kl=0.0, fluency=3.0)
    points = [SweepPoint(1.0, 0.5, 0.1, 3.2), SweepPoint(2.0, 0.9, 0.3, 3.9), SweepPoint(4.0, 2.0, 2.0, 6.0)]
    assert suggest(base, points, 1.0) == 2.0  # 4.0 lifts most but costs 3 nats more
    assert suggest(base, points, 0.1) is None
    assert suggest(base, points, 10.0) == 4.0
    request = SweepRequest(
        "tiny", Intervention(feature, "add", 1.0), (5.0, 30.0), PROMPTS[:2], PROMPTS[2:], max_new_tokens=8, max_cost_increase=50.0
    )
    result = runtime.sweep(request)
    if result.suggested is not None:
        assert [p.strength for p in result.heldout] == [None, result.suggested]
        assert all(len(p.token_ids) == 2 for p in result.heldout)
    link = sweep_permalink(request)
    assert link.startswith("/saes/tiny/sweep?") and f"key={request.key()}" in link
    assert SweepRequest.from_dict(result.request) == request


def test_a_target_token_lift_is_its_mean_probability(runtime, feature):
    request = SweepRequest("tiny", Intervention(feature, "add", 1.0), (0.0,), PROMPTS[:2], (), target_token=" the", max_new_tokens=6)
    result = runtime.sweep(request)
    assert result.lift_kind == "token" and 0 <= result.points[0].lift <= 1 and not math.isnan(result.points[0].lift)


def test_bad_sweeps_are_refused(runtime, feature):
    with pytest.raises(LiveError):
        runtime.sweep(SweepRequest("tiny", Intervention(feature, "add", 1.0), (), PROMPTS))
    with pytest.raises(LiveError):
        runtime.sweep(SweepRequest("tiny", Intervention(feature, "add", 1.0), (1.0,), PROMPTS, max_new_tokens=1000))


def test_the_model_process_runs_a_sweep_and_streams_its_progress(runtime, feature):
    from sae_core.live.pool import ModelServer, parse_intervention

    server = ModelServer(runtime, runtime.cfg)
    events: list[dict] = []
    body = {"sae": "tiny", "intervention": f"{feature}:add:1@gen", "strengths": [0, 40], "prompts": list(PROMPTS[:2]), "heldout": []}
    result = server.execute({"op": "sweep", "request": body | {"max_new_tokens": 6}}, lambda: None, events.append)
    assert [p["strength"] for p in result["points"]] == [0.0, 40.0] and result["key"]
    assert events and events[-1]["progress"]["done"] == events[-1]["progress"]["total"]
    assert parse_intervention([feature, "cap", 2, "3>0.5"]) == Intervention(feature, "cap", 2.0, Condition("feature", 3, 0.5))
    assert parse_intervention([feature, "add", 2]) == parse_intervention(f"{feature}:add:2") == Intervention(feature, "add", 2.0)
    with pytest.raises(LiveError):
        server.execute({"op": "sweep", "request": {"sae": "tiny"}}, lambda: None)


# Batching changes the metrics by floating-point order only: in float32, relative 1e-4 (absolute 1e-5 for a
# KL near zero).
METRIC_REL, METRIC_ABS = 1e-4, 1e-5


@pytest.fixture(scope="module")
def dense_feature(runtime):
    """The feature firing on the most tokens of TEXT: its lift on any continuation is not zero."""
    held = runtime.sae("tiny")
    ids = runtime.lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    z = held.loaded.sae.encode(runtime.lm.residuals(torch.tensor([ids]), held.layer)[0].float())
    return int((z[1:] > 0).float().mean(0).argmax())


@pytest.mark.parametrize("lift", ["feature", "token"])
def test_a_batched_sweeps_lift_kl_and_fluency_equal_one_by_one_runs(runtime, feature, dense_feature, lift):
    """Each (prompt, strength) run alone (a one-prompt sweep in batches of one row: no padding, no other rows)
    gives per-token measures; their token-weighted means are the batched sweep's points (4 prompts of
    different lengths, left-padded, 5 rows a batch)."""
    strengths = (0.0, 20.0, 80.0)
    target = {"target_feature": dense_feature} if lift == "feature" else {"target_token": " the"}
    iv = Intervention(feature, "add", 1.0)
    batched = runtime.sweep(SweepRequest("tiny", iv, strengths, PROMPTS, (), max_new_tokens=10, batch_rows=5, **target))
    alone = [runtime.sweep(SweepRequest("tiny", iv, strengths, (p,), (), max_new_tokens=10, batch_rows=1, **target)) for p in PROMPTS]
    assert any(p.lift > 0 for p in batched.points), "a lift that is zero everywhere would test nothing"
    for k, point in enumerate([batched.baseline, *batched.points]):
        runs = [one.baseline if k == 0 else one.points[k - 1] for one in alone]
        assert [r.token_ids[0] for r in runs] == point.token_ids, point.strength
        n = [len(r.token_ids[0]) for r in runs]
        for name in ("lift", "kl", "fluency"):
            mean = sum(getattr(r, name) * w for r, w in zip(runs, n)) / sum(n)
            assert getattr(point, name) == pytest.approx(mean, rel=METRIC_REL, abs=METRIC_ABS), (point.strength, name)


def _run_job(runtime, cfg: LiveConfig, request: dict) -> tuple[dict, dict]:
    """One request through the model process's job loop (ModelServer.run_jobs, where the time limits apply)."""
    import threading

    from sae_core.live.pool import ModelServer, _Job

    server = ModelServer(runtime, cfg)
    server.state = "ready"
    threading.Thread(target=server.run_jobs, daemon=True).start()
    job = _Job(request)
    server.pending += 1
    server.jobs.put(job)
    assert job.done.wait(300)
    assert job.answer is not None
    return job.answer, server.counts


def test_a_sweep_runs_under_its_own_time_limit_not_a_generations(runtime, feature):
    """live_time_limit bounds one generation; a sweep, many generations in one request, has live_sweep_time_limit."""
    body = {"sae": "tiny", "intervention": f"{feature}:add:1", "strengths": [10, 40], "prompts": list(PROMPTS), "heldout": [],
            "max_new_tokens": 24, "batch_rows": 1}  # 12 generations of 24 tokens, one by one  # fmt: skip
    whole, counts = _run_job(runtime, LiveConfig(live_time_limit=0.05, live_sweep_time_limit=300), {"op": "sweep", "request": body})
    assert whole["ok"] and whole["result"]["stopped"] is None and counts["completed"] == 1, whole
    assert whole["result"]["seconds"] > 0.05  # it ran past the generation limit and was not stopped
    cut, counts = _run_job(runtime, LiveConfig(live_time_limit=300, live_sweep_time_limit=0.05), {"op": "sweep", "request": body})
    assert cut["ok"] and cut["result"]["stopped"] == "time_limit" and counts["timed_out"] == 1, cut

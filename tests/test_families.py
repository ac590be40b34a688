"""Feature families: matching recovers a planted split (a narrow SAE's direction is the normalised sum of
two wide SAE directions and fires where they fire), a decoy near in cosine but firing elsewhere is
rejected by co-activation; on mined tiny SAEs `build_families` stores split and match relations, and
the pages and the API show them with links across SAEs."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import mine_tiny
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from sqlalchemy import select
from sqlalchemy.orm import Session

from sae_core.config import FamilyConfig
from sae_core.errors import SaescopeError
from sae_core.relations.families import active_matrix, build_families, match_relations, split_relations
from sae_core.sae.topk import TopKConfig, TopKSAE
from sae_core.store import db
from sae_core.store.schema import SAE, FeatureRelation

D, WIDE, NARROW, SPLITS = 64, 48, 24, 8
DECOY = 40  # a wide feature pointed at parent 0 that fires on its own tokens


def planted(tokens: int = 3000, seed: int = 0):
    """Wide decoder: orthonormal rows, but row DECOY leans on parent 0. Narrow decoder: parents 0..7 are
    normalised sums of wide rows (2p, 2p+1); parents 8..23 copy wide rows 16..31; wide rows 32..47 have
    no parent. Each token fires 3 wide features; a parent fires wherever one of its children fires."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen))
    wide = q[:WIDE].clone()
    narrow = torch.empty(NARROW, D)
    for p in range(SPLITS):
        narrow[p] = torch.nn.functional.normalize(wide[2 * p] + wide[2 * p + 1], dim=0)
    narrow[SPLITS:] = wide[2 * SPLITS : 2 * SPLITS + NARROW - SPLITS]
    wide[DECOY] = torch.nn.functional.normalize(narrow[0] + 0.3 * wide[DECOY], dim=0)
    rng = np.random.default_rng(seed)
    fired = np.stack([rng.choice(WIDE, 3, replace=False) for _ in range(tokens)])
    parent_of = {c: c // 2 for c in range(2 * SPLITS)} | {c: c - SPLITS for c in range(2 * SPLITS, 2 * SPLITS + NARROW - SPLITS)}
    rows = np.repeat(np.arange(tokens), 3)
    active_wide = sp.csr_matrix((np.ones(len(rows), np.int32), (rows, fired.ravel())), shape=(tokens, WIDE))
    parent_hits = sorted({(t, parent_of[c]) for t, c in zip(rows.tolist(), fired.ravel().tolist()) if c in parent_of})
    pr, pc = np.array(parent_hits).T
    active_narrow = sp.csr_matrix((np.ones(len(pr), np.int32), (pr, pc)), shape=(tokens, NARROW))
    return narrow, wide, active_narrow, active_wide


def expected_pairs() -> set[tuple[int, int]]:
    return {(p, 2 * p) for p in range(SPLITS)} | {(p, 2 * p + 1) for p in range(SPLITS)} | {(p, p + SPLITS) for p in range(SPLITS, NARROW)}


def test_split_recovers_the_planted_children_and_rejects_the_decoy():
    narrow, wide, active_narrow, active_wide = planted()
    rel = split_relations(narrow, wide, active_narrow, active_wide, min_cosine=0.4, min_coactivation=0.2)
    assert set(zip(rel.source.tolist(), rel.target.tolist())) == expected_pairs()
    split = rel.source < SPLITS
    assert np.allclose(rel.cosine[split], 2**-0.5, atol=1e-5) and np.allclose(rel.cosine[~split], 1.0, atol=1e-5)
    assert (rel.coactivation == 1.0).all()  # a parent fires wherever its child fires
    # the decoy is parent 0's nearest wide feature by cosine, and only co-activation turns it away
    cos_decoy = torch.nn.functional.cosine_similarity(wide[DECOY], narrow[0], dim=0)
    assert cos_decoy > 0.9 and DECOY not in rel.target.tolist()
    loose = split_relations(narrow, wide, active_narrow, active_wide, min_cosine=0.4, min_coactivation=0.0)
    assert (0, DECOY) in set(zip(loose.source.tolist(), loose.target.tolist()))


def test_split_recovered_through_real_sae_encoders():
    """TopK SAEs with the planted decoders (tied encoders, a small negative bias) encode activations built
    from the wide features: the relations found from their codes are the planted ones."""
    narrow_w, wide_w, _, _ = planted()
    wide_w[DECOY] = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))[0][0]  # an ordinary feature here
    saes = []
    for w, k in ((narrow_w, 3), (wide_w, 3)):
        sae = TopKSAE(TopKConfig(d_in=D, n_latents=len(w), k=k))
        with torch.no_grad():
            sae.W_dec.copy_(w)
            sae.W_enc.copy_(w)
            sae.b_enc.fill_(-0.05)
            sae.b_pre.zero_()
        saes.append(sae)
    rng = np.random.default_rng(3)
    fired = np.stack([rng.choice(2 * SPLITS + NARROW - SPLITS, 2, replace=False) for _ in range(2000)])  # children with a parent
    x = torch.zeros(len(fired), D)
    for j in range(2):
        x += wide_w[torch.from_numpy(fired[:, j])] * torch.from_numpy(rng.uniform(1, 3, len(fired))).float().unsqueeze(1)
    a_narrow, a_wide = active_matrix(saes[0], x), active_matrix(saes[1], x)
    rel = split_relations(narrow_w, wide_w, a_narrow, a_wide, min_cosine=0.4, min_coactivation=0.5)
    assert set(zip(rel.source.tolist(), rel.target.tolist())) == expected_pairs()


def test_match_finds_the_same_features_in_a_permuted_copy():
    _, wide, _, active_wide = planted()
    perm = torch.randperm(WIDE, generator=torch.Generator().manual_seed(2))
    rel = match_relations(wide, wide[perm], active_wide, active_wide[:, perm.numpy()], min_cosine=0.7, min_coactivation=0.2)
    assert sorted(zip(rel.source.tolist(), rel.target.tolist())) == sorted((int(perm[j]), j) for j in range(WIDE))
    assert np.allclose(rel.cosine, 1.0, atol=1e-5) and (rel.coactivation == 1.0).all()


# ---------------------------------------------------------------- mined SAEs, the store and the pages


@pytest.fixture(scope="module")
def family_store(tiny_sae_dir, tiny_lm, tmp_path_factory):
    """A store with the tiny 128-latent SAE, a 64-latent one and a second 128-latent seed, all trained on
    the same cache and mined, with their families built."""
    from sae_core.train import TrainConfig, train

    root = tmp_path_factory.mktemp("family")
    cache = tiny_sae_dir.parent / "cache"
    narrow = root / "tiny-64"
    train(TrainConfig(n_latents=64, k=6, batch_size=128, tokens=128 * 80, lr=2e-3), cache, narrow, progress=False)
    seed1 = root / "tiny-128-seed1"  # "another seed" that learned the same dictionary in another order: every feature has a match
    shutil.copytree(tiny_sae_dir, seed1, ignore=shutil.ignore_patterns("checkpoint.pt"))
    weights = load_file(seed1 / "sae_weights.safetensors")
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    weights = {
        "W_dec": weights["W_dec"][perm],
        "W_enc": weights["W_enc"][:, perm],
        "b_enc": weights["b_enc"][perm],
        "b_dec": weights["b_dec"],
    }
    save_file({k: v.contiguous() for k, v in weights.items()}, seed1 / "sae_weights.safetensors")
    url = f"sqlite:///{root / 'store.db'}"
    for folder in (tiny_sae_dir, narrow, seed1):
        mine_tiny(folder, tiny_lm, url)
    result = build_families(["tiny-sae", "tiny-64", "tiny-128-seed1"], FamilyConfig(db=url, sample_tokens=2000), progress=False)
    return url, result


def test_build_families_stores_splits_and_matches(family_store):
    url, result = family_store
    assert result.saes == ["tiny-64", "tiny-128-seed1", "tiny-sae"]  # narrowest first
    assert result.splits > 0 and result.matches > 0 and "cache" in result.sample_source
    assert result.example is not None and result.example[0] == "tiny-64"
    assert {(u.a, u.b) for u in result.universality} == {("tiny-128-seed1", "tiny-sae"), ("tiny-sae", "tiny-128-seed1")}
    engine = db.make_engine(url)
    with Session(engine) as s:
        rels = s.scalars(select(FeatureRelation)).all()
    assert {r.kind for r in rels} == {"split", "match"}
    assert all(r.cosine >= (0.4 if r.kind == "split" else 0.7) and 0.2 <= r.coactivation <= 1.0 and r.co_fired > 0 for r in rels)
    # each child has one parent in each narrower SAE
    children = [(r.target_run_id, r.target_feature, r.source_run_id) for r in rels if r.kind == "split"]
    assert len(children) == len(set(children))
    # a rebuild replaces the relations instead of adding to them
    again = build_families(["tiny-sae", "tiny-64", "tiny-128-seed1"], FamilyConfig(db=url, sample_tokens=2000), progress=False)
    with Session(engine) as s:
        assert len(s.scalars(select(FeatureRelation)).all()) == len(rels) == again.splits + again.matches


def test_build_families_refuses_bad_input(family_store):
    url, _ = family_store
    with pytest.raises(SaescopeError, match="at least two"):
        build_families(["tiny-sae"], FamilyConfig(db=url), progress=False)
    with pytest.raises(SaescopeError, match="no mined SAE named 'nope'"):
        build_families(["tiny-sae", "nope"], FamilyConfig(db=url), progress=False)


def _relations_by_name(url: str) -> list[tuple]:
    """Every stored relation with its SAEs by name (run ids differ between stores), sorted."""
    from sqlalchemy.orm import aliased

    source, target = aliased(SAE), aliased(SAE)
    R = FeatureRelation
    engine = db.make_engine(url)
    with Session(engine) as s:
        rows = s.execute(
            select(R.kind, source.name, R.source_feature, target.name, R.target_feature, R.cosine, R.coactivation, R.co_fired)
            .join(source, source.active_run_id == R.source_run_id)
            .join(target, target.active_run_id == R.target_run_id)
        ).all()
    engine.dispose()
    return sorted(tuple(r) for r in rows)


def test_sqlite_and_postgresql_give_the_same_families(family_store, tiny_lm, pg_url):
    """The three SAEs mined into PostgreSQL and matched there store the relations SQLite holds: the same
    pairs, cosines, co-activation shares and counts."""
    from pathlib import Path

    url, result = family_store
    engine = db.make_engine(url)
    with Session(engine) as s:
        folders = dict(s.execute(select(SAE.name, SAE.path)).all())
    engine.dispose()
    for name in result.saes:
        mine_tiny(Path(folders[name]), tiny_lm, pg_url)
    on_pg = build_families(["tiny-sae", "tiny-64", "tiny-128-seed1"], FamilyConfig(db=pg_url, sample_tokens=2000), progress=False)
    assert (on_pg.splits, on_pg.matches, on_pg.example) == (result.splits, result.matches, result.example)
    stored = _relations_by_name(pg_url)
    assert len(stored) == result.splits + result.matches and stored == _relations_by_name(url)


def _a_split(url: str) -> tuple[int, int]:
    engine = db.make_engine(url)
    with Session(engine) as s:
        r = s.scalars(select(FeatureRelation).where(FeatureRelation.kind == "split").order_by(FeatureRelation.cosine.desc())).first()
        assert r is not None
        return r.source_feature, r.target_feature


def test_pages_link_parents_children_and_matches(family_store):
    from app.main import create_app

    url, _ = family_store
    parent, child = _a_split(url)
    client = TestClient(create_app(url))
    feature = client.get(f"/saes/tiny-64/features/{parent}")
    assert feature.status_code == 200 and f"/saes/tiny-64/features/{parent}/relations" in feature.text
    fragment = client.get(f"/saes/tiny-64/features/{parent}/relations").text
    assert f'href="/saes/tiny-sae/features/{child}"' in fragment or f'href="/saes/tiny-128-seed1/features/{child}"' in fragment
    assert f'href="/saes/tiny-64/features/{parent}/family"' in fragment
    family = client.get(f"/saes/tiny-64/features/{parent}/family")
    assert family.status_code == 200 and "<svg" in family.text
    assert re.search(rf'href="/saes/tiny-(sae|128-seed1)/features/{child}"', family.text)
    assert "style=" not in family.text and "<script>" not in family.text  # under the CSP: no inline style or script
    child_sae = "tiny-sae" if f'href="/saes/tiny-sae/features/{child}"' in family.text else "tiny-128-seed1"
    up = client.get(f"/saes/{child_sae}/features/{child}/relations").text
    assert f'href="/saes/tiny-64/features/{parent}"' in up
    api = client.get(f"/api/v1/saes/tiny-64/features/{parent}/relations").json()
    assert any(c["sae"] in ("tiny-sae", "tiny-128-seed1") and c["index"] == child for c in api["children"])
    tree = client.get(f"/api/v1/saes/{child_sae}/features/{child}/family").json()
    assert tree["root"]["sae"] == "tiny-64" and tree["root"]["index"] == parent


def test_family_tree_svg_holds_only_svg_elements():
    """Tokens with whitespace or control characters stay inside the SVG: an HTML element such as <span> or
    <br> in inline SVG ends it in the HTML parser, and the tree's other nodes then spill out as text."""
    from app.families import tree_svg

    def node(index: int, token: str, children: list) -> dict:
        return {"sae": "s", "index": index, "n_latents": 8, "density": 0.01, "explanation": "x", "top_tokens": [token],
                "cosine": 0.5, "children": children}  # fmt: skip

    root = node(0, " believe", [node(1, " trust\n", []), node(2, "", []), node(3, "a\x01<b>", [])])
    svg = str(tree_svg(root, {"sae": "s", "index": 0}))
    assert set(re.findall(r"<([a-z]+)", svg)) <= {"svg", "line", "text", "a", "title", "rect", "tspan"}
    assert svg.count("<rect") == 4 and '<tspan class="ws">·</tspan>believe' in svg and "&lt;b&gt;" in svg


def test_stability_badge_counts_matches_in_other_seeds(family_store):
    from app.main import create_app

    url, _ = family_store
    engine = db.make_engine(url)
    with Session(engine) as s:
        r = s.scalars(select(FeatureRelation).where(FeatureRelation.kind == "match")).first()
        assert r is not None
        source = s.scalar(select(SAE.name).where(SAE.active_run_id == r.source_run_id))
    client = TestClient(create_app(url))
    api = client.get(f"/api/v1/saes/{source}/features/{r.source_feature}/relations").json()
    assert api["stability"] == {"seeds": 1, "matched": 1, "min_cosine": pytest.approx(r.cosine, abs=1e-6)}
    assert "matched in 1 of 1" in client.get(f"/saes/{source}/features/{r.source_feature}/relations").text


def test_feature_without_relatives_says_so(mined_store):
    from app.main import create_app

    client = TestClient(create_app(mined_store))  # one SAE, no family built
    api = client.get("/api/v1/saes/tiny-sae/features/3/relations").json()
    assert api["parents"] == api["children"] == api["matches"] == [] and api["stability"] is None
    assert "saescope family --saes tiny-sae" in client.get("/saes/tiny-sae/features/3/relations").text
    assert client.get("/api/v1/saes/tiny-sae/features/99999/relations").status_code == 404
    assert client.get("/saes/nope/features/1/family").status_code == 404


def test_demo_family_names_a_narrower_and_a_wider_sae():
    from sae_core.config import DemoConfig
    from saescope.demo import family_names

    assert family_names(DemoConfig()) == {
        2048: "smollm2-135m-L8-topk-2k",
        8192: "smollm2-135m-L8-topk-8k",
        32768: "smollm2-135m-L8-topk-32k",
    }
    assert family_names(DemoConfig(name="mine", n_latents=4096)) == {1024: "mine-1k", 4096: "mine", 16384: "mine-16k"}


@pytest.fixture(scope="module")
def family_server(family_store):
    from conftest import LiveServer

    from app.main import create_app

    live = LiveServer(create_app(family_store[0]))
    yield live.url
    live.stop()


def test_browser_follows_family_links_under_the_csp(family_store, family_server):
    """Feature page -> its relatives (loaded by htmx) -> the family tree -> a child's box -> the child's page,
    whose relatives link back to the parent; any console error (a CSP violation is one) fails the test."""
    from test_browser import CHROMIUM

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium with apt)")
    from playwright.sync_api import sync_playwright

    parent, child = _a_split(family_store[0])
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.goto(f"{family_server}/saes/tiny-64/features/{parent}")
        page.click("#relations a.family-link")
        page.wait_for_url(f"**/saes/tiny-64/features/{parent}/family")
        assert page.locator("svg.family-tree a").count() >= 2
        page.locator(f'svg.family-tree a[href$="/features/{child}"]').first.click()
        page.wait_for_url(f"**/features/{child}")
        page.wait_for_selector(f'#relations a.relative[href="/saes/tiny-64/features/{parent}"]')
        browser.close()
    assert not errors, f"JavaScript errors or CSP violations: {errors}"


def test_re_mining_drops_its_relations_and_marks_relatives_changed(family_store, tiny_lm, tmp_path):
    """A re-mined SAE's old run goes with its relations; the SAEs they linked to change revision (their
    pages and ETags switch), and relations among the others stay."""
    import sqlite3
    from pathlib import Path

    from test_mine import small

    from sae_core.mine import mine

    source = sqlite3.connect(family_store[0].removeprefix("sqlite:///"))
    copy = sqlite3.connect(tmp_path / "store.db")
    source.backup(copy)
    source.close()
    copy.close()
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = db.make_engine(url)

    def state():
        with Session(engine) as s:
            revisions = dict(s.execute(select(SAE.name, SAE.revision)).all())
            runs = dict(s.execute(select(SAE.name, SAE.active_run_id)).all())
            kinds = [(r.kind, r.source_run_id, r.target_run_id) for r in s.scalars(select(FeatureRelation))]
            folder = s.scalar(select(SAE.path).where(SAE.name == "tiny-64"))
        return revisions, runs, kinds, folder

    before, runs, kinds, folder = state()
    assert any(runs["tiny-64"] in (a, b) for _, a, b in kinds)
    mine(Path(folder), small(url, force=True), lm=tiny_lm, progress=False)
    after, runs_after, kinds_after, _ = state()
    assert not any(runs_after["tiny-64"] in (a, b) or runs["tiny-64"] in (a, b) for _, a, b in kinds_after)
    assert {k for k, _, _ in kinds_after} == {"match"}  # the two 128-latent SAEs' matches remain
    assert after["tiny-sae"] > before["tiny-sae"] and after["tiny-128-seed1"] > before["tiny-128-seed1"]

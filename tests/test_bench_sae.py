"""`saescope bench-sae` (sae_core/evaluation): the pieces on planted data, the SAEBench JSON against
SAEBench 0.6.0's field names and types, and the command on the tiny mined SAE.

tests/data/saebench_0.6.0_fields.json is SAEBench 0.6.0's eval output JSON schemas
(sae_bench/evals/<eval>/eval_output_schema_<type>.json) reduced to their structure (types, properties,
required fields; titles and descriptions dropped), keyed by eval_type_id, so the check needs no install."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_core.evaluation import saebench_json
from sae_core.evaluation.meta_sae import train_meta_sae
from sae_core.evaluation.result import METRICS, BenchResult
from sae_core.evaluation.sparse_probing import KS, sparse_probe, top_k_mean_diff

SCHEMAS = json.loads((Path(__file__).parent / "data" / "saebench_0.6.0_fields.json").read_text())


# ---------------------------------------------------------------- sparse probing


def _planted(n: int, latents: int, seed: int, planted: int | None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = np.maximum(rng.normal(0, 1, (n, latents)), 0)  # noise latents, non-negative like SAE codes
    if planted is not None:
        z[:, planted] = y * (2 + rng.random(n))  # fires exactly on the positives
    return z, y


def test_probing_recovers_a_planted_latent():
    z, y = _planted(800, 64, 0, planted=17)
    zt, yt = _planted(800, 64, 1, planted=17)
    assert top_k_mean_diff(z, y, 1).tolist() == [17]
    acc = sparse_probe(z, y, zt, yt)
    assert set(acc) == {f"top{k}" for k in KS}
    assert acc["top1"] > 0.99 and acc["top20"] > 0.99


def test_probing_noise_latents_are_at_chance():
    z, y = _planted(800, 64, 0, planted=None)
    zt, yt = _planted(800, 64, 1, planted=None)
    acc = sparse_probe(z, y, zt, yt)
    assert abs(acc["top1"] - 0.5) < 0.08 and abs(acc["top5"] - 0.5) < 0.08


# ---------------------------------------------------------------- meta-SAE


def _rows_from_basis(n_rows: int, basis_size: int, d: int, per_row: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.nn.functional.normalize(torch.randn(basis_size, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(basis_size, generator=g)[:per_row] for _ in range(n_rows)])
    coef = torch.rand(n_rows, per_row, generator=g) + 0.5
    return torch.nn.functional.normalize((coef[:, :, None] * basis[idx]).sum(1), dim=1)


def _fvu(meta, rows: torch.Tensor) -> float:
    with torch.no_grad():
        return float((rows - meta(rows)).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum())


def test_meta_sae_decomposes_a_decoder_built_from_a_small_basis():
    rows = _rows_from_basis(256, 8, 32, 2, seed=0)  # every row: a positive mix of 2 of 8 directions
    meta = train_meta_sae(rows, latents=8, k=2, steps=300, seed=0, batch=256, lr=1e-2)
    assert _fvu(meta, rows) < 0.02
    noise = torch.nn.functional.normalize(torch.randn(256, 32, generator=torch.Generator().manual_seed(1)), dim=1)
    meta = train_meta_sae(noise, latents=8, k=2, steps=300, seed=0, batch=256, lr=1e-2)
    assert _fvu(meta, noise) > 0.4  # random directions are no sums of 2 of 8


# ---------------------------------------------------------------- SAEBench JSON


def _check(value, schema: dict, defs: dict, where: str) -> None:
    """A small JSON-schema check of what SAEBench's schemas use: $ref, type object with properties and
    required, arrays of items, anyOf (optional fields), scalar types."""
    if "$ref" in schema:
        return _check(value, defs[schema["$ref"].split("/")[-1]], defs, where)
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                return _check(value, option, defs, where)
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{where}: matches no option: {errors}")
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        assert isinstance(value, dict), f"{where}: not an object"
        missing = set(schema.get("required", [])) - set(value)
        assert not missing, f"{where}: missing {sorted(missing)}"
        unknown = set(value) - set(schema["properties"])
        assert not unknown, f"{where}: fields SAEBench does not have: {sorted(unknown)}"
        for key, sub in value.items():
            _check(sub, schema["properties"][key], defs, f"{where}.{key}")
    elif kind == "array":
        assert isinstance(value, list), f"{where}: not a list"
        for i, item in enumerate(value):
            _check(item, schema.get("items", {}), defs, f"{where}[{i}]")
    elif kind == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an integer"
    elif kind == "string":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"
    elif kind == "null":
        assert value is None, f"{where}: {value!r} is not null"


def validate(output: dict) -> None:
    schema = SCHEMAS[output["eval_type_id"]]
    _check(output, schema, schema.get("$defs", {}), output["eval_type_id"])


def _full_result() -> BenchResult:
    """Metrics and details shaped as the suite's modules produce them, every eval present."""
    metrics = {name: 0.5 for name in METRICS}
    metrics.update(tokens=4096.0, meta_sae_latents=16.0, meta_sae_k=4.0)
    letters = [
        {
            "first_letter": c,
            "mean_absorption_fraction": 0.1,
            "full_absorption_rate": 0.05,
            "num_full_absorption": 1,
            "num_probe_true_positives": 20,
            "num_split_features": 2,
            "main_latents": [3, 5],
            "main_latent_f1": 0.9,
        }
        for c in "ab"
    ]
    tasks = [{"name": "pos: noun", "mode": "token", "train": 64, "test": 64, "llm": 0.9, "sae": 0.85, **{f"top{k}": 0.7 for k in KS}}]
    n = 4
    core = {
        "feature_density": [0.1] * n,
        "consistent_activation_heuristic": [1.5] * n,
        "encoder_bias": [0.0] * n,
        "encoder_norm": [1.0] * n,
        "encoder_decoder_cosine_sim": [0.9] * n,
        "max_decoder_cosine_sim": [0.2] * n,
        "max_encoder_cosine_sim": [0.3] * n,
    }
    details = {
        "core": {"tokens": 4096},
        "sparse_probing": {"tasks": tasks, "token_mean": {"top1": 0.7}},
        "meta_sae": {"steps": 10, "train_time_seconds": 1.0, "mse": 0.01},
        "absorption": {"letters": letters},
        "interpretability": {"llm_detection_std": 0.1},
    }
    config = {"model": "tiny", "model_dtype": "float32", "batch_size": 8, "corpus": "demo", "context_size": 128, "n_latents": 64}
    return BenchResult("tiny-sae", 0, metrics, True, details, [], config, per_latent=core)


def test_saebench_json_validates_against_saebench_schemas():
    outputs = saebench_json.eval_outputs(_full_result(), {"d_in": 8, "d_sae": 64, "architecture": "topk"}, per_latent=True)
    kinds = {o["eval_type_id"] for o in outputs}
    assert kinds == {"core", "sparse_probing", "meta_structure_decoder_variance", "absorption_first_letter", "autointerp"}
    for output in outputs:
        validate(json.loads(json.dumps(output)))
    core = next(o for o in outputs if o["eval_type_id"] == "core")
    assert len(core["eval_result_details"]) == 4 and core["eval_result_metrics"]["shrinkage"]["l2_ratio"] == 0.5


def test_the_validator_rejects_foreign_and_missing_fields():
    output = saebench_json.eval_outputs(_full_result(), {}, per_latent=False)[0]
    output["eval_result_metrics"]["sparsity"]["l0_per_token"] = 1.0
    with pytest.raises(AssertionError, match="l0_per_token"):
        validate(output)
    output = saebench_json.eval_outputs(_full_result(), {}, per_latent=False)[0]
    del output["eval_result_metrics"]["shrinkage"]["relative_reconstruction_bias"]
    with pytest.raises(AssertionError, match="relative_reconstruction_bias"):
        validate(output)


def test_absorption_json_is_left_out_when_the_probe_is_too_weak():
    result = _full_result()
    result.absorption_valid = False
    kinds = {o["eval_type_id"] for o in saebench_json.eval_outputs(result, {})}
    assert "absorption_first_letter" not in kinds and "core" in kinds


# ---------------------------------------------------------------- the command


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    code = "from saescope.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def test_unknown_sae_is_a_clear_error(mined_store):
    r = _cli("bench-sae", "--sae", "no-such-sae", "--db", mined_store)
    assert r.returncode == 2
    assert "no SAE named 'no-such-sae' in the store; the store has" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_bench_sae_on_the_tiny_mined_sae(tiny_sae_dir, tiny_lm, tmp_path, rule_llm):
    from conftest import mine_tiny
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from sae_core.evaluation.config import BenchConfig
    from sae_core.evaluation.suite import run_suite
    from sae_core.store import db
    from sae_core.store.benchmarks import read_benchmarks, save_benchmark
    from sae_core.store.schema import SAE

    folder = shutil.copytree(tiny_sae_dir, tmp_path / "tiny-sae")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    mine_tiny(folder, tiny_lm, url)
    engine = db.open_store(url)
    with Session(engine) as s:
        name = s.execute(select(SAE.name)).scalar_one()
    cfg = BenchConfig(
        sae=name, tokens=1024, batch_size=8, window_stride=1, meta_sae_steps=30, absorption_words=200, n2g_features=16, db=url
    )
    cfg.device, cfg.model_dtype = "cpu", "float32"
    result, where = run_suite(cfg, lm=tiny_lm, progress=False, engine=engine)
    m = result.metrics
    assert Path(where) == folder
    assert 0 < m["fvu"] < 1 and abs(m["explained_variance"] - (1 - m["fvu"])) < 1e-9
    assert 0 < m["cossim"] <= 1 and m["l2_ratio"] > 0 and m["l0"] <= 6 + 1e-6
    assert m["relative_reconstruction_bias"] > 0 and m["kl_div_with_ablation"] > m["kl_div_with_sae"]
    assert 0 <= m["meta_sae_fvu"] and m["meta_sae_latents"] == 32
    assert m["n2g_f1"] >= 0 and m["n2g_features"] > 0  # no stored N2G explanations: N2G ran on a sample
    assert "absorption_first_letter_probe_f1" in m and result.absorption_valid in (True, False)
    assert set(m) <= set(METRICS)
    # the tiny corpus labels nothing: no probing task, so no probing metric (never a made-up number)
    assert "sparse_probing_top1_accuracy" not in m and result.details["sparse_probing"]["skipped"]
    save_benchmark(engine, result.stored())
    with Session(engine) as s:
        (stored,) = read_benchmarks(s, name)
    assert BenchResult.from_stored(stored).metrics == pytest.approx(m)
    assert "feature_density" not in json.dumps(stored.results)  # per-latent lists go to the JSON files only
    paths = saebench_json.write_files(result, result.saebench[0]["sae_cfg_dict"], where)
    for path in paths:
        validate(json.loads(path.read_text()))
    assert {p.name for p in paths} >= {"core_eval_results.json", "meta_structure_decoder_variance_eval_results.json"}
    # the command: another seed, stored beside the first, its JSON in the SAE folder
    from typer.testing import CliRunner

    from saescope.cli import app

    args = ["bench-sae", "--sae", name, "--seed", "1", "--db", url, "--tokens", "1024", "--window-stride", "1", "--meta-sae-steps", "30"]
    args += ["--absorption-words", "200", "--n2g-features", "16", "--device", "cpu", "--model-dtype", "float32"]
    args += ["--api-base", rule_llm, "--llm-model", "rule", "--llm-features", "4", "--llm-examples", "4"]  # and LLM detection
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "core: fvu" in r.output and "stages:" in r.output
    assert "interpretability: llm_detection_score" in r.output and "LLM detection: rule explained and detection-scored 4" in r.output
    with Session(engine) as s:
        first, second = read_benchmarks(s, name)
    assert (first.seed, second.seed) == (0, 1) and "llm_detection_score" not in first.results
    assert 0 <= second.results["llm_detection_score"] <= 1
    assert (folder / "saebench" / "seed1" / "core_eval_results.json").is_file()
    autointerp = json.loads((folder / "saebench" / "seed1" / "autointerp_eval_results.json").read_text())
    validate(autointerp)
    assert autointerp["eval_result_metrics"]["autointerp"]["autointerp_score"] == second.results["llm_detection_score"]


def test_first_letter_activations_from_the_cached_prefix_equal_whole_prompts(tiny_lm):
    from sae_core.evaluation.absorption import vocabulary_words, word_activations, word_activations_full

    words = vocabulary_words(tiny_lm.tokenizer, 40, seed=0)
    assert len(words) >= 5 and all(w.startswith(" ") and w[1:].isalpha() for _, w in words)  # the tiny BPE has few
    cached = word_activations(tiny_lm, 1, words, batch=16)
    full = word_activations_full(tiny_lm, 1, words, batch=16)
    assert cached.shape == full.shape == (len(words), tiny_lm.d_model)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_sae_page_and_api_show_the_benchmark(tiny_sae_dir, tiny_lm, tmp_path):
    from conftest import mine_tiny
    from fastapi.testclient import TestClient
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from app.main import create_app
    from sae_core.store import db
    from sae_core.store.benchmarks import save_benchmark
    from sae_core.store.schema import SAE

    url = f"sqlite:///{tmp_path / 'store.db'}"
    mine_tiny(shutil.copytree(tiny_sae_dir, tmp_path / "tiny-sae"), tiny_lm, url)
    engine = db.open_store(url)
    with Session(engine) as s:
        name = s.execute(select(SAE.name)).scalar_one()
    for seed, fvu in ((0, 0.25), (1, 0.27)):
        result = _full_result()
        result.sae, result.seed, result.absorption_valid = name, seed, False
        result.metrics["fvu"] = fvu
        del result.metrics["absorption_fraction"]
        result.details["absorption"] = {"skipped": "the model's first-letter probe reaches mean F1 0.420 at this hook, below 0.8"}
        save_benchmark(engine, result.stored())
    with TestClient(create_app(url)) as client:
        body = client.get(f"/api/v1/saes/{name}").json()
        assert [b["seed"] for b in body["benchmarks"]] == [0, 1]
        assert body["benchmarks"][1]["metrics"]["fvu"] == 0.27 and body["benchmarks"][0]["absorption_valid"] is False
        page = client.get(f"/saes/{name}").text
    assert 'id="benchmark"' in page and "seed 1" in page and "<td>0.27</td>" in page
    assert "Absorption not measured (seed 0): the model&#39;s first-letter probe reaches mean F1 0.420" in page
    assert "absorption fraction" not in page  # no seed has it: no row of dashes


# ---------------------------------------------------------------- sparse probing's data path


@pytest.fixture
def labelled_corpus(tmp_path, monkeypatch):
    """The demo corpus in miniature (test_metrics.py's): four sources, Brown files with their tags."""
    from test_metrics import fake_demo_corpus

    root = fake_demo_corpus(tmp_path / "corpus", docs=4, sentences=24)
    monkeypatch.setattr("sae_core.settings.corpus_dir", lambda: root)
    return root


def _planted_collector(tiny_lm, per_batch: int = 4, skip: int = 1):
    """ProbingCollector fed, as evaluate_loaded feeds it, the miniature demo's windows with activations that
    carry the labels by construction: dimension 0 is 3 on a noun's last token, dimension 1 is 2 on every
    token of a Moby-Dick document, the rest noise. Latents 5 and 40 of a TopK SAE read those two dimensions."""
    from sae_core import corpus as corpus_mod
    from sae_core.evaluation.sparse_probing import ProbingCollector
    from sae_core.metrics.labels import POS_TASKS, TokenLabeller
    from sae_core.sae import TopKConfig, TopKSAE

    corpus = corpus_mod.open_corpus("demo")
    labeller = TokenLabeller(corpus, tiny_lm.tokenizer)
    collector = ProbingCollector(labeller, max_tokens=10**9)
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=16, n_latents=64, k=8))
    with torch.no_grad():
        sae.W_enc[5], sae.W_enc[40] = 4 * torch.eye(16)[0], 4 * torch.eye(16)[1]
    g = torch.Generator().manual_seed(0)
    windows = list(corpus_mod.iter_windows(corpus, tiny_lm.tokenizer, 64, seed=0))
    for start in range(0, len(windows), per_batch):
        batch = corpus_mod.Windows.cat(windows[start : start + per_batch])
        labels = labeller.label(batch.doc_index[:, skip:].ravel(), batch.doc_offset[:, skip:].ravel())
        x = 0.3 * torch.randn(len(labels.pos), 16, generator=g)
        x[:, 0] = 3 * torch.from_numpy(labels.pos == list(POS_TASKS).index("noun")).float()
        moby = labeller.sources.index("Moby-Dick") if "Moby-Dick" in labeller.sources else -2  # sources are met as read
        x[:, 1] = 2 * torch.from_numpy(labels.source == moby).float()
        with torch.no_grad():
            z = sae.encode(x)
            collector(batch, skip, x, z, sae(x))
    return collector, sae, len(windows)


def test_probing_collector_builds_tasks_split_by_window_and_finds_planted_latents(labelled_corpus, tiny_lm):
    from sae_core import corpus as corpus_mod
    from sae_core.evaluation.sparse_probing import MIN_SEGMENT, run_sparse_probing
    from sae_core.metrics.labels import NO_LABEL, POS_TASKS

    collector, sae, n_windows = _planted_collector(tiny_lm)
    assert collector.windows_seen == n_windows >= 60
    sources = collector.labeller.sources
    assert set(sources) == set(corpus_mod.DEMO_SOURCES.values())
    tasks, data = collector.tasks(per_class=96, seed=0)
    names = {(t.mode, t.name) for t in tasks}
    # per token: the parts of speech the miniature Brown has (no plural or proper nouns) and each source;
    # mean-pooled: the sources only (a part of speech belongs to a token, not to a run of text)
    have = ("noun", "past-tense verb", "adjective", "preposition")
    assert names == {("token", f"pos: {p}") for p in have} | {(m, f"source: {s}") for s in sources for m in ("token", "pooled")}
    assert not {n for m, n in names if m == "pooled" and n.startswith("pos: ")}

    pos, source, window = (np.concatenate(getattr(collector, f)) for f in ("pos", "source", "window"))
    pooled_source, pooled_window = np.array(collector.pooled_source), np.array(collector.pooled_window)
    assert len(data["token"]) == len(pos) and len(data["pooled_x"]) == len(data["pooled_z"]) == len(pooled_source)
    test_windows = set()
    for t in tasks:
        (tr, ytr), (te, yte) = t.train, t.test
        assert ytr.mean() == yte.mean() == 0.5 and len(set(tr)) == len(tr) and len(set(te)) == len(te)  # balanced, no repeats
        w = window if t.mode == "token" else pooled_window
        assert not set(w[tr]) & set(w[te]), f"{t.mode} {t.name}: a window gives examples to both splits"
        test_windows |= set(w[te])
        label = source if t.name.startswith("source: ") else pos
        if t.mode == "pooled":
            label = pooled_source
        want = sources.index(t.name[8:]) if t.name.startswith("source: ") else list(POS_TASKS).index(t.name[5:])
        for rows, y in ((tr, ytr), (te, yte)):
            assert (label[rows][y == 1] == want).all() and (label[rows][y == 0] != want).all()
            assert (label[rows] != NO_LABEL).all()
    # one split for all tasks: the test windows are the same half of the windows whatever the task
    assert 0.3 < len(test_windows) / n_windows < 0.7

    # a pooled example is the mean over one document's run in one window: Moby-Dick's dimension is exactly 2
    # there (no separator, no other document's token mixed in) and 0 elsewhere
    moby = pooled_source == sources.index("Moby-Dick")
    torch.testing.assert_close(data["pooled_x"][:, 1], torch.from_numpy(2.0 * moby).float())
    assert moby.any() and (~moby).any() and len(pooled_source) >= 2 * n_windows // 3
    counts = np.bincount(pooled_window, minlength=n_windows)
    assert counts.max() <= 64 // MIN_SEGMENT

    metrics, details = run_sparse_probing(collector, sae, per_class=96, seed=0)
    rows = {(r["mode"], r["name"]): r for r in details["tasks"]}
    for key in (("token", "pos: noun"), ("token", "source: Moby-Dick"), ("pooled", "source: Moby-Dick")):
        assert rows[key]["top1"] > 0.97 and rows[key]["llm"] > 0.97, (key, rows[key])
    noun = next(t for t in tasks if (t.mode, t.name) == ("token", "pos: noun"))
    with torch.no_grad():
        z = sae.encode(data["token"][noun.train[0]]).numpy()
    assert top_k_mean_diff(z, noun.train[1], 1).tolist() == [5]
    assert set(metrics) == {f"sparse_probing_top{k}_accuracy" for k in KS} | {"sae_probe_accuracy", "llm_probe_accuracy"}
    assert details["token_mean"] and details["pooled_mean"]

    # the same data with the labels shuffled over the examples: nothing to find, every k at chance
    rng = np.random.default_rng(1)
    collector.pos, collector.source = [rng.permutation(pos)], [rng.permutation(source)]
    collector.pooled_source = rng.permutation(pooled_source).tolist()
    _, shuffled = run_sparse_probing(collector, sae, per_class=96, seed=0)
    big = [r for r in shuffled["tasks"] if r["test"] >= 96]
    assert len(big) >= 6
    for k in KS:
        assert abs(np.mean([r[f"top{k}"] for r in big]) - 0.5) < 0.08, k
    assert max(r["top1"] for r in big) < 0.7


# ---------------------------------------------------------------- LLM detection (delphi-style)


class RuleLLM(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions served over real HTTP, answering by a fixed rule the way a
    literal-minded model would: the explanation names the token marked most often in the excerpts; detection
    says 1 for an excerpt that holds that token; fuzzing says 1 where a marked span holds it."""

    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        kind = "explain" if body["messages"][0]["role"] == "system" else "detection" if "would activate" in prompt else "fuzzing"
        RuleLLM.seen.append({"kind": kind, "auth": self.headers.get("Authorization"), "model": body["model"], "prompt": prompt})
        if kind == "explain":
            marked = Counter(m.strip() for m in re.findall(r"<<(.*?)>>", prompt) if m.strip())
            answer = f'Explanation: the token "{marked.most_common(1)[0][0] if marked else "?"}" only'
        else:
            token = re.search(r'explained as: the token "(.*)" only', prompt).group(1)
            excerpts = re.findall(r"^\d+\. (.*)$", prompt.split("\n\n", 2)[-1], flags=re.M)
            if kind == "detection":
                answer = json.dumps([int(token in e) for e in excerpts])
            else:
                answer = json.dumps([int(any(token in m for m in re.findall(r"<<(.*?)>>", e))) for e in excerpts])
        usage = {"prompt_tokens": len(prompt) // 4, "completion_tokens": 8}
        data = json.dumps({"choices": [{"message": {"content": answer}}], "usage": usage})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def rule_llm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), RuleLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    RuleLLM.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_llm_detection_runs_on_a_seeded_sample_through_an_openai_compatible_endpoint(mined_store, rule_llm, monkeypatch):
    from sqlalchemy import func, select

    from sae_core.config import BenchConfig
    from sae_core.errors import SaescopeError
    from sae_core.evaluation.interpretability import interpretability_metrics
    from sae_core.store import db
    from sae_core.store.schema import SAE, Explanation

    monkeypatch.setenv("BENCH_LLM_KEY", "sk-bench-7c1")
    cfg = BenchConfig(sae="tiny-sae", api_base=rule_llm, llm_model="rule", api_key_env="BENCH_LLM_KEY", llm_features=6, llm_examples=4)
    engine = db.open_store(mined_store)
    with engine.connect() as conn:
        run_id = conn.scalar(select(SAE.active_run_id).where(SAE.name == "tiny-sae"))
        stored_before = conn.scalar(select(func.count()).select_from(Explanation))

        def run(seed: int) -> tuple[dict, dict, list[str]]:
            RuleLLM.seen.clear()
            m, d = interpretability_metrics(conn, run_id, 4, seed, cfg.llm_config(), cfg.llm_features)
            return m, d, [s["prompt"] for s in RuleLLM.seen if s["kind"] == "explain"]

        m, d, explained = run(0)
        assert len(explained) == 6 and {s["kind"] for s in RuleLLM.seen} == {"explain", "detection", "fuzzing"}
        assert all(s["auth"] == "Bearer sk-bench-7c1" and s["model"] == "rule" for s in RuleLLM.seen)
        assert d["llm_detection_features"] == sum(s["kind"] == "detection" for s in RuleLLM.seen) >= 5
        assert "rule explained and detection-scored 6 fired features (seed 0)" == d["llm_detection_source"]
        assert d["llm_usage"]["requests"] == len(RuleLLM.seen) and d["llm_usage"]["total_tokens"] > 0
        # the tiny SAE's features fire on tokens: naming the most-marked token tells its contexts from others'
        assert 0.55 < m["llm_detection_score"] <= 1 and d["llm_detection_std"] >= 0
        assert "n2g_f1" in m  # N2G still scores its own sample beside it
        again = run(0)
        assert again[0]["llm_detection_score"] == m["llm_detection_score"] and again[2] == explained  # the seed fixes the sample
        assert run(1)[2] != explained
        assert conn.scalar(select(func.count()).select_from(Explanation)) == stored_before  # nothing written
    # without an endpoint: no LLM request, and the metric is absent rather than made up
    RuleLLM.seen.clear()
    with engine.connect() as conn:
        m, d = interpretability_metrics(conn, run_id, 4, 0, BenchConfig(sae="tiny-sae").llm_config(), 6)
    assert "llm_detection_score" not in m and "no LLM endpoint configured" in d["llm_detection"] and not RuleLLM.seen
    with pytest.raises(SaescopeError, match="--llm-model"):
        BenchConfig(sae="tiny-sae", api_base=rule_llm).llm_config()


def test_probing_rides_on_the_evaluation_of_a_labelled_corpus(labelled_corpus, tiny_sae_dir, tiny_lm):
    """The suite's wiring: the collector as an observer of evaluate_loaded (the tiny SAE evaluated on the
    labelled miniature demo instead of its own corpus). Its rows are the model's activations at the hook
    for exactly the labelled tokens, and the probing reports every task with accuracies in range."""
    import copy

    from sae_core import corpus as corpus_mod
    from sae_core.evaluate import EvalConfig, evaluate_loaded
    from sae_core.evaluation.sparse_probing import ProbingCollector, run_sparse_probing
    from sae_core.interchange import load_sae
    from sae_core.metrics.labels import NO_LABEL, TokenLabeller
    from sae_core.model import parse_hook

    loaded = load_sae(tiny_sae_dir)
    ours = copy.deepcopy(loaded.cfg["metadata"]["saescope"])
    ours["cache"]["corpus"], ours["cache_windows"] = "demo", 0  # read the labelled corpus from its first window
    loaded = loaded._replace(cfg={**loaded.cfg, "metadata": {**loaded.cfg["metadata"], "saescope": ours}})
    assert (loaded.provenance.corpus, loaded.provenance.trained_windows) == ("demo", 0)
    corpus = corpus_mod.open_corpus("demo")
    collector = ProbingCollector(TokenLabeller(corpus, tiny_lm.tokenizer), max_tokens=10**9)
    cfg = EvalConfig(
        tokens=32 * 96, batch_size=8, window_stride=1, probe_per_class=0, ablation_positions=0, device="cpu", model_dtype="float32"
    )
    evaluate_loaded(loaded, tiny_sae_dir, cfg, tiny_lm, progress=False, observers=[collector])
    prov = loaded.provenance
    assert collector.windows_seen == 96
    windows = corpus_mod.Windows.cat(list(corpus_mod.iter_windows(corpus, tiny_lm.tokenizer, prov.context_size, prov.seed))[:96])
    skip = prov.skip_positions
    labels = collector.labeller.label(windows.doc_index[:, skip:].ravel(), windows.doc_offset[:, skip:].ravel())
    keep = (labels.pos != NO_LABEL) | (labels.source != NO_LABEL)
    with torch.inference_mode():
        _, h = tiny_lm.logits_and_residual(torch.from_numpy(windows.tokens).long(), parse_hook(prov.hook))
    x = h[:, skip:].float().reshape(-1, tiny_lm.d_model)[torch.from_numpy(keep)]
    torch.testing.assert_close(torch.cat(collector.x), x, rtol=1e-4, atol=1e-4)
    assert (np.concatenate(collector.pos) == labels.pos[keep]).all()
    metrics, details = run_sparse_probing(collector, loaded.sae, per_class=64, seed=0)
    modes = {r["mode"] for r in details["tasks"]}
    assert modes == {"token", "pooled"} and all(0 <= r[key] <= 1 for r in details["tasks"] for key in ("top1", "top20", "sae", "llm"))
    assert 0 <= metrics["sparse_probing_top1_accuracy"] <= metrics["llm_probe_accuracy"] + 0.2

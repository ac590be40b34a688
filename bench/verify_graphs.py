"""Faithfulness of attribution graphs by intervention (issue 29 items 3, 4; sae_core/circuits/verify.py): trace a set
of prompts on one loaded model and report, per graph, how many of its strongest kept feature-source edges match their
ablation in the real model, and whether ablating its strongest feature node moves the top logit as the graph predicts.

    nice .venv/bin/python bench/verify_graphs.py --transcoders DIR --db sqlite:///COPY.db [--prompt P ...]

Default: ten prompts, five of them ones the bundled model answers with confidence.
"""

from __future__ import annotations

import argparse
import json
import time

PROMPTS = [
    "Fact: the capital of the state containing Dallas is the city of",
    "The opposite of hot is",
    "One, two, three, four,",
    "The cat sat on the",
    "Paris is the capital of",
    # prompts the bundled model answers with confidence (its top token and probability, float32)
    "The official language of the country whose capital is Madrid is",  # ' Spanish' 0.28: the demo's two-step prompt
    "The Colosseum is in Rome, the capital of",  # ' Italy' 0.82
    "The mother tongue of people born in Berlin is",  # ' German' 0.30
    "The Eiffel Tower is in the city of",  # ' Paris' 0.66
    "The capital of the country whose currency is the yen is",  # ' Japan' 0.60 (a wrong first hop: Tokyo)
]


def main() -> None:
    from sae_core.circuits.trace import TraceConfig, trace, transcoder_set
    from sae_core.model import load_model
    from sae_core.store import db
    from sae_core.store import graphs as store_graphs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transcoders", required=True)
    ap.add_argument("--db", required=True, help="a store to write the graphs into (use a copy)")
    ap.add_argument("--prompt", action="append", help="repeatable; default: five built-in prompts")
    ap.add_argument("--verify-edges", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--min-direction-rate",
        type=float,
        default=0.5,
        help="fail unless the strongest node's ablation moves the top logit the predicted way on more than this share",
    )
    ap.add_argument(
        "--min-match-rate",
        type=float,
        default=0.5,
        help="fail unless the strongest node's ablation matches the graph (direction and within 3x) on more than this share",
    )
    args = ap.parse_args()
    lm = load_model(transcoder_set(args.transcoders).model, args.device, "float32")
    rows = []
    for prompt in args.prompt or PROMPTS:
        start = time.monotonic()
        cfg = TraceConfig(prompt, args.transcoders, db=args.db, verify_edges=args.verify_edges, force=True, device=args.device)
        result = trace(cfg, lm=lm)
        v = result.verification or {}
        node = v.get("strongest") or {}
        engine = db.open_store(args.db)
        with engine.connect() as conn:
            timings = store_graphs.find_graph(conn, result.slug).scores["seconds"]
        engine.dispose()
        nodes = result.graph["nodes"]
        adjacent = [nodes[e["target"]]["layer"] - nodes[e["source"]]["layer"] == 1 for e in v.get("edges", [])]
        row = {
            "prompt": prompt,
            "slug": result.slug,
            "seconds": round(time.monotonic() - start, 1),
            "verify_seconds": round(timings["verify"], 2),
            "attribution_seconds": round(timings["attribution"], 1),
            "checked": v.get("checked"),
            "matched": v.get("matched"),
            "node_predicted": node.get("predicted"),
            "node_predicted_direct": node.get("predicted_direct"),
            "node_measured": node.get("measured"),
            "node_match": node.get("match"),
            "node_match_direct": node.get("match_direct"),
            "node_sign_agrees": None if not node else (node["predicted"] > 0) == (node["measured"] > 0),
            "edges": [(e["predicted"], e["measured"], e["match"]) for e in v.get("edges", [])],
            "adjacent": adjacent,  # per edge: whether the target is in the next layer (no MLP between)
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    checked = sum(r["checked"] or 0 for r in rows)
    matched = sum(r["matched"] or 0 for r in rows)
    nodes = [r for r in rows if r["node_match"] is not None]
    direction = sum(r["node_sign_agrees"] for r in nodes)
    direct_sign = sum((r["node_predicted_direct"] > 0) == (r["node_measured"] > 0) for r in nodes)
    print(f"edges: {matched} of {checked} match (sign and within 3x), per graph {[r['matched'] for r in rows]} of {args.verify_edges}")
    signs = [sum((p > 0) == (m > 0) for p, m, _ in r["edges"]) for r in rows]
    print(f"edges: {sum(signs)} of {checked} with the predicted sign, per graph {signs}")
    for adj in (True, False):
        span = [e[2] for r in rows for e, a in zip(r["edges"], r["adjacent"]) if a == adj]
        print(f"edges {'into the next layer' if adj else 'across more layers'}: {sum(span)} of {len(span)} match")
    print(
        f"strongest node, sum over paths: {direction} of {len(nodes)} in the predicted direction, "
        f"{sum(r['node_match'] for r in nodes)} of {len(nodes)} within 3x too"
    )
    print(
        f"strongest node, direct edge only: {direct_sign} of {len(nodes)} in the predicted direction, "
        f"{sum(r['node_match_direct'] for r in nodes)} of {len(nodes)} within 3x too"
    )
    matched_nodes = sum(r["node_match"] for r in nodes)
    if not nodes or matched_nodes / len(nodes) <= args.min_match_rate:
        raise SystemExit(
            f"the strongest node's ablation matched the graph (direction and within 3x) on {matched_nodes} of {len(nodes)} "
            f"prompts, not more than {args.min_match_rate:.0%}"
        )
    if direction / len(nodes) <= args.min_direction_rate:
        raise SystemExit(
            f"the strongest node moved the top logit the predicted way on {direction} of {len(nodes)} prompts, "
            f"not more than {args.min_direction_rate:.0%}"
        )


if __name__ == "__main__":
    main()

"""Interchange check: the real `sae-lens` loads an SAE we saved and encodes exactly as we do.

    python bench/interop_saelens.py [--python /path/to/venv/bin/python]

Without --python it creates bench/out/venv-saelens (torch==2.13.0 CPU, then `pip install sae-lens`).
We save a TopK SAE (random weights with non-zero biases, so every parameter matters) and 4096 real
activations of the bundled model; SAELens' `SAE.load_from_disk` reads the folder in its own
process and writes its encodings and reconstructions; we compare them with ours.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sae_core.interchange import load_sae, save_sae  # noqa: E402
from sae_core.sae import TopKConfig, TopKSAE  # noqa: E402

PEER = r'''
import json, sys, torch
from safetensors.torch import load_file, save_file
import sae_lens
from sae_lens import SAE
folder, inputs, out = sys.argv[1:4]
sae = SAE.load_from_disk(folder, device="cpu")
x = load_file(inputs)["x"]
with torch.no_grad():
    z = sae.encode(x)
    x_hat = sae.decode(z)
save_file({"z": z.contiguous(), "x_hat": x_hat.contiguous()}, out)
print(json.dumps({"sae_lens": sae_lens.__version__, "class": type(sae).__name__, "k": getattr(sae.cfg, "k", None)}))
'''


def ensure_venv(python: str | None) -> str:
    if python:
        return python
    venv = ROOT / "bench" / "out" / "venv-saelens"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "sae-lens"], check=True)
    return str(py)


def activations(n: int) -> torch.Tensor:
    from sae_core import corpus as corpus_mod
    from sae_core.model import load_model

    lm = load_model("smollm2-135m", dtype="float32")
    windows = corpus_mod.iter_windows(corpus_mod.open_corpus("demo"), lm.tokenizer, 128, 0)
    ids = torch.cat([torch.from_numpy(w.tokens) for _, w in zip(range(-(-n // 127)), windows)]).long()
    return lm.residuals(ids, 8)[:, 1:].reshape(-1, lm.d_model)[:n].float().contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", help="python of a venv with sae-lens installed")
    ap.add_argument("--n-latents", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
    python = ensure_venv(args.python)
    tmp = Path(tempfile.mkdtemp(prefix="saescope-interop-"))
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=576, n_latents=args.n_latents, k=args.k))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.5)
    x = activations(4096)
    scale = float((x.pow(2).sum(1).mean()) ** -0.5)    # as in training: the scale gets folded into the biases
    save_sae(sae, tmp / "sae", scale=scale, metadata={"cache": {"model": "smollm2-135m", "hook": "blocks.8.hook_resid_post", "context_size": 128}})
    ours, _ = load_sae(tmp / "sae")
    save_file({"x": x}, str(tmp / "x.safetensors"))
    proc = subprocess.run([python, "-c", PEER, str(tmp / "sae"), str(tmp / "x.safetensors"), str(tmp / "peer.safetensors")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"SAELens failed to load our SAE:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    peer = load_file(str(tmp / "peer.safetensors"))
    with torch.no_grad():
        z = ours.encode(x)
        x_hat = ours(x)
        z_trained = sae.encode(x * scale) / scale          # the unsaved SAE on scaled inputs, back in raw units
    same_support = ((z > 0) == (peer["z"] > 0)).float().mean().item()
    print(f"sae-lens {info['sae_lens']} loaded our folder as {info['class']} (k={info['k']}); {len(x)} real activations of smollm2-135m L8")
    print(f"encode: max |z_ours - z_saelens| = {(z - peer['z']).abs().max():.3g} (max |z| {z.abs().max():.3g}); "
          f"active sets agree on {same_support:.4%} of entries")
    print(f"decode: max |x_hat_ours - x_hat_saelens| = {(x_hat - peer['x_hat']).abs().max():.3g} (max |x| {x.abs().max():.3g})")
    print(f"fold:   max |z_saved - z_trained/scale| = {(z - z_trained).abs().max():.3g}")
    ok = torch.allclose(z, peer["z"], atol=1e-3, rtol=1e-4) and torch.allclose(x_hat, peer["x_hat"], atol=1e-3, rtol=1e-4)
    print("MATCH" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

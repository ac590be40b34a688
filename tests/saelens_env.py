"""The real sae-lens, in a virtual environment of its own (its dependencies are not ours): built once at
bench/out/venv-sae-lens (shared with bench/train_throughput.py and bench/arch_throughput.py) and reused.
Tests that need it skip, saying why, where it cannot be built (no package index reachable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "bench" / "out" / "venv-sae-lens"
PACKAGES = [["torch==2.13.0"], ["sae-lens==6.54.12"]]  # torch first: the CPU wheel, not a CUDA stack


def python_or_skip() -> str:
    """The venv's python, building the venv first when it is missing (minutes, once)."""
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import sae_lens"], capture_output=True).returncode == 0:
        return str(py)
    if os.environ.get("SAESCOPE_NO_PEER_VENVS"):
        pytest.skip(f"the sae-lens venv {VENV} is missing and SAESCOPE_NO_PEER_VENVS forbids building it")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, capture_output=True, timeout=300)
        for packages in PACKAGES:
            subprocess.run([str(py), "-m", "pip", "install", "-q", *packages], check=True, capture_output=True, text=True, timeout=1200)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"could not build the sae-lens venv at {VENV} (no package index reachable?): {(exc.stderr or '')[-400:]}")
    except subprocess.TimeoutExpired:
        pytest.skip(f"building the sae-lens venv at {VENV} timed out")
    return str(py)


PEER = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from sae_lens import SAE
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig

job = json.loads(Path(sys.argv[1]).read_text())
x = load_file(job["inputs"])["x"]
out, report = {}, {"ours": {}, "theirs": {}}
with torch.no_grad():
    for arch, folder in job["ours"].items():  # what saescope saved, read by SAELens
        sae = SAE.load_from_disk(folder, device="cpu")
        out[f"ours.{arch}"] = sae.encode(x).contiguous()
        report["ours"][arch] = {"class": type(sae).__name__}
    # SAELens' own SAEs of each architecture, saved as training folders and as inference (jumprelu) folders
    d, n = x.shape[1], 64
    torch.manual_seed(0)
    made = {
        "batchtopk": BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d, d_sae=n, k=4)),
        "matryoshka_batchtopk": MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(d_in=d, d_sae=n, k=4, matryoshka_widths=[16, 64])),
        "jumprelu": JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=n)),
    }
    scale = x.norm(dim=1).mean() / d ** 0.5
    for arch, sae in made.items():
        sae.W_enc.normal_(0, 1 / d ** 0.5)
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(n, d), dim=1))
        sae.b_enc.normal_(0, 0.1 * float(scale))
        sae.b_dec.copy_(x.mean(0))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(n) * float(scale) * 2)
        else:
            sae.topk_threshold.fill_(float(scale))
        root = Path(job["out"])
        sae.save_inference_model(root / f"{arch}-inference")
        sae.save_model(root / f"{arch}-training")
        inference = SAE.load_from_disk(str(root / f"{arch}-inference"), device="cpu")
        z = inference.encode(x).contiguous()
        for kind in ("inference", "training"):
            out[f"theirs.{arch}-{kind}"] = z.clone()
            report["theirs"][f"{arch}-{kind}"] = {"expect": "jumprelu" if kind == "inference" else arch}
save_file(out, job["codes"])
print(json.dumps(report))
"""


def roundtrip(python: str, ours: dict[str, Path], x: torch.Tensor, tmp: Path) -> dict:
    """Run PEER: {"ours": {arch: {"class", "z"}}, "theirs": {folder: {"expect", "z"}}}, SAELens' folders
    written under tmp/saelens."""
    (tmp / "saelens").mkdir(parents=True, exist_ok=True)
    save_file({"x": x}, str(tmp / "x.safetensors"))
    job = {
        "inputs": str(tmp / "x.safetensors"),
        "codes": str(tmp / "codes.safetensors"),
        "out": str(tmp / "saelens"),
        "ours": {arch: str(folder) for arch, folder in ours.items()},
    }
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "peer.py").write_text(PEER)
    proc = subprocess.run([python, str(tmp / "peer.py"), str(tmp / "job.json")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    codes = load_file(str(tmp / "codes.safetensors"))
    for side in ("ours", "theirs"):
        for name, info in report[side].items():
            info["z"] = codes[f"{side}.{name}"]
    return report

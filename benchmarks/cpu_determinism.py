"""Benchmark: which CPU code-path switches change pre-training numbers, and what pinning them costs.

Float results differ between CPUs because the kernels pick their instruction set at run time. Three
libraries do that in torch's CPU build, each with a switch that pins the choice:

* ATen's own kernels (element-wise ops, softmax, layer norm, reductions): `ATEN_CPU_CAPABILITY`
  (default / avx2 / avx512);
* MKL (the matrix products of the CPU build, BLAS_INFO=mkl): conditional numerical reproducibility,
  `MKL_CBWR` (COMPATIBLE / AVX2 / AVX512 ...);
* oneDNN (convolutions, some fused ops): `ONEDNN_MAX_CPU_ISA` (SSE41 / AVX2 / AVX512_CORE ...).

Each setting below runs the same pre-training steps of our model (the train_throughput.py "tiny" size,
random weights and batches from fixed seeds, alternating single- and two-stream steps, AdamW) in a
fresh process with that environment, and records the loss of every step (exactly, as float hex) and a
digest of the final weights. A setting whose digest equals the default's did not change the code path
the host picks; one that differs did, i.e. it is one of the switches through which the host's ISA
reaches the numbers. `pinned-avx2` sets all three to AVX2, the widest path every x86 CPU of the last
ten years has; run twice, it must repeat itself. Whether it also repeats on another vendor's CPU can
only be measured there: run this script on both and compare the `pinned-avx2` digests it prints.

    python benchmarks/cpu_determinism.py                 # ~2 min on an idle 2-core CPU

The last line is one JSON object: per setting its digest, whether it equals the default's, the
median seconds per step and the ratio to the default's (the cost of pinning).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "default": {},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "mkl-avx2": {"MKL_CBWR": "AVX2"},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "pinned-avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "pinned-avx2-again": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "pinned-compatible": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
SWITCHES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def worker(steps: int, batch_size: int, threads: int) -> dict:
    """The steps in this process; returns the loss history (hex floats), the weights' digest, step times."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import SIZES, make_batch, ours, ours_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ours(SIZES["tiny"]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    losses, times = [], []
    for step in range(steps):
        batch = make_batch(batch_size, 20, 36, seed=step, device=torch.device("cpu"))
        tic = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = ours_loss("single" if step % 2 == 0 else "two")(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - tic)
        losses.append(float(loss).hex())
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return {
        "losses": losses,
        "weights_sha256": digest.hexdigest(),
        "seconds_per_step": statistics.median(times[1:] or times),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def run_setting(name: str, env: dict, args) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    result = subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{name}: the worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), help="default: all (always with default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.steps, args.batch_size, args.threads)))
        return

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "unknown")
    print(f"CPU: {cpu}; load average {os.getloadavg()[0]:.2f}; {args.steps} steps, batch {args.batch_size}, {args.threads} threads")
    chosen = ["default"] + [name for name in args.settings if name != "default"]
    outcomes = {name: run_setting(name, SETTINGS[name], args) for name in chosen}
    default = outcomes["default"]
    summary = {}
    print(f"{'setting':<20} {'ATen path':<10} {'weights sha256':<18} {'= default':<10} {'first differing step':<21} {'s/step':>7} {'x default':>9}")
    for name, outcome in outcomes.items():
        same = outcome["weights_sha256"] == default["weights_sha256"]
        first = next((i for i, (a, b) in enumerate(zip(outcome["losses"], default["losses"])) if a != b), None)
        ratio = outcome["seconds_per_step"] / default["seconds_per_step"]
        print(f"{name:<20} {outcome['capability']:<10} {outcome['weights_sha256'][:16]:<18} {str(same):<10} {str(first):<21} "
              f"{outcome['seconds_per_step']:7.3f} {ratio:9.2f}")
        summary[name] = {"env": SETTINGS[name], "aten_capability": outcome["capability"], "weights_sha256": outcome["weights_sha256"],
                         "equals_default": same, "first_differing_step": first, "seconds_per_step": round(outcome["seconds_per_step"], 4),
                         "time_ratio_to_default": round(ratio, 3), "final_loss": float.fromhex(outcome["losses"][-1])}
    repeat = None
    if {"pinned-avx2", "pinned-avx2-again"} <= set(outcomes):
        repeat = outcomes["pinned-avx2"]["weights_sha256"] == outcomes["pinned-avx2-again"]["weights_sha256"]
        print(f"pinned-avx2 repeats itself: {repeat}")
    print(json.dumps({"cpu": cpu, "steps": args.steps, "pinned_avx2_repeats": repeat, "settings": summary}))


if __name__ == "__main__":
    main()

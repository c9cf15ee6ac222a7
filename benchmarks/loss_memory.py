"""Peak memory and time of one forward+backward of the KD loss, from final hidden states and
output-layer weights: the fused path (distill.fused, `loss.fused: auto`), the project's full-logit
path (`loss.fused: never`) and a plain full-logit KL (`kl_div(log_softmax(s), log_softmax(t))`).

Each measurement runs in a fresh process. Memory is the peak above what the inputs already hold
(hidden states, both output layers), and the working memory: the peak less the student output
weight's float32 gradient, which every path ends up holding: CPU resident set (VmHWM, reset after setup, with glibc's
mmap threshold fixed so freed blocks leave the resident set), or CUDA max allocated on a GPU. Forward KL at T=1 with every token a target; student width 2,048, teacher 4,096.

    python benchmarks/loss_memory.py [--cases 32000x2048 128256x4096] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = ("plain", "project_full_logits", "fused")


def _rss_peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(path: str, vocab: int, tokens: int, student_width: int, teacher_width: int, device: str, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from distill.config import LossConfig
    from distill.objective import Outputs, build_objective

    torch.manual_seed(0)
    hs = torch.randn(tokens, student_width, device=device, requires_grad=True)
    ht = torch.randn(tokens, teacher_width, device=device)
    s_head = nn.Linear(student_width, vocab, bias=False, device=device)
    t_head = nn.Linear(teacher_width, vocab, bias=False, device=device).requires_grad_(False)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    objective = build_objective(LossConfig(terms=[{"kind": "logits", "name": "kd"}], chunk_size=chunk))

    def step():
        if path == "plain":
            s = s_head(hs)
            with torch.no_grad():
                t = t_head(ht)
            loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
        elif path == "project_full_logits":
            s = s_head(hs)
            with torch.no_grad():
                t = t_head(ht)
            loss = objective.total(objective.sums(Outputs(logits=s), Outputs(logits=t), labels))
        else:
            loss = objective.total(objective.sums(Outputs(features=hs, head=s_head), Outputs(features=ht, head=t_head), labels, vocab=vocab))
        loss.backward()
        return float(loss)

    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _rss_peak_reset()
        base = _status("VmRSS")
    start = time.perf_counter()
    loss = step()
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")) - base
    hs.grad = s_head.weight.grad = None
    second = first
    if first < 60:  # a second, warm pass where it is cheap
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        second = time.perf_counter() - start
    # Every path ends holding the student output weight's gradient ([V, H] float32): the rest is the loss's working memory.
    grad_bytes = s_head.weight.numel() * 4
    return {"path": path, "vocab": vocab, "tokens": tokens, "device": device, "loss": loss, "peak_bytes": peak,
            "working_bytes": peak - grad_bytes, "weight_grad_bytes": grad_bytes, "seconds": min(first, second), "chunk_size": chunk}


def measure(path: str, vocab: int, tokens: int, args) -> dict:
    argv = [sys.executable, __file__, "--child", path, "--cases", f"{vocab}x{tokens}", "--device", args.device, "--chunk", str(args.chunk),
            "--student-width", str(args.student_width), "--teacher-width", str(args.teacher_width)]
    # A fixed mmap threshold: glibc otherwise raises it after the first large free and keeps freed
    # blocks in its heap, so the resident set would count memory the loss no longer holds.
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if not args.default_malloc else {})}
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        reason = "killed (out of memory)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1][:200]
        return {"path": path, "vocab": vocab, "tokens": tokens, "device": args.device, "failed": reason}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["32000x2048", "128256x4096"], help="VOCABxTOKENS")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk", type=int, default=0, help="loss.chunk_size of the project's paths (0: by the vocabulary, as the default)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's dynamic mmap threshold on (faster small chunks, but freed memory stays resident)")
    parser.add_argument("--student-width", type=int, default=2048)
    parser.add_argument("--teacher-width", type=int, default=4096)
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    cases = [tuple(int(x) for x in case.split("x")) for case in args.cases]
    if args.child:
        (vocab, tokens), = cases
        print(json.dumps(child(args.child, vocab, tokens, args.student_width, args.teacher_width, args.device, args.chunk)))
        return
    results = []
    print(f"{'vocab':>7} {'tokens':>6} {'path':<20} {'peak MB':>9} {'x plain':>8} {'working MB':>10} {'x plain':>8} {'seconds':>8} {'x plain':>8}")
    for vocab, tokens in cases:
        plain = None
        for path in PATHS:
            r = measure(path, vocab, tokens, args)
            results.append(r)
            if "failed" in r:
                print(f"{vocab:>7} {tokens:>6} {path:<20} {r['failed']}")
                continue
            plain = plain or (r if path == "plain" else None)
            ratio = lambda key: f"{r[key] / plain[key]:.2f}x" if plain else "-"
            r["peak_vs_plain"] = r["peak_bytes"] / plain["peak_bytes"] if plain else None
            r["working_vs_plain"] = r["working_bytes"] / plain["working_bytes"] if plain else None
            r["time_vs_plain"] = r["seconds"] / plain["seconds"] if plain else None
            print(f"{vocab:>7} {tokens:>6} {path:<20} {r['peak_bytes'] / 2**20:>9.0f} {ratio('peak_bytes'):>8} {r['working_bytes'] / 2**20:>10.0f} "
                  f"{ratio('working_bytes'):>8} {r['seconds']:>8.2f} {ratio('seconds'):>8}")
    print(f"forward+backward of forward KL, student width {args.student_width}, teacher width {args.teacher_width}, "
          f"float32, {args.device}; memory above the inputs (working: also above the output weight's gradient); fresh process each")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("loss_memory_default_malloc.json" if args.default_malloc else "loss_memory.json")
    path.write_text(json.dumps({"student_width": args.student_width, "teacher_width": args.teacher_width, "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

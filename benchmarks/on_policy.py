"""On-policy and sequence-level distillation on the tiny default, side by side, and the on-policy step's
speed against TRL's GKDTrainer.

Quality (``--quality``): the same new student (configs/tiny.yaml), seed and learning rate for every row,
``--steps`` steps of micro-batch 16, prompts the first 32 tokens of each document (``data.packing: false``),
64 new tokens, the divergence GKD recommends (JSD, beta 0.5) for every KD row:

- ``ce``: the data alone (``loss.alpha=1``), the baseline of the teacher-forced rows;
- ``lambda 0``: today's teacher-forced KD on the data; ``lambda 0.5``, ``lambda 1``: ``rollout.on_policy`` (steps
  drawn, the default ``rollout.draw=step``, GKD's rule); ``lambda 0.5 per row``: rows drawn (``rollout.draw=row``);
- ``seq-KD ce``: CE on the teacher's completions of the training prompts (``distill generate-teacher``,
  Kim & Rush's sequence-level KD), the baseline of ``seq-KD + JSD``: the same data with the JSD term.

Then GKD's own setting (the students of the GKD paper start from a fine-tuned model): the ``lambda 0``
student trained ``--more-steps`` more at lr 1e-3 with lambda 0, 0.5 (steps and rows drawn) and 1; and the
student ``configs/tiny_on_policy.yaml`` starts from (CE on the data, built by ``distill prepare-tiny``)
trained ``--steps`` at lr 1e-3 with JSD and with reverse KL at lambda 0, 0.5 and 1, with ``--trl`` beside
TRL's ``GKDTrainer`` from the same student (beta 0.5 and 1, lambda 0 and 0.5).

Each student then samples (temperature 1) 64 tokens for each of 128 held-out prompts (the first 32
tokens of validation documents); reported: the teacher's per-token NLL of those completions (lower:
text the teacher finds likelier), distinct-2 (unique bigrams / bigrams, to catch collapse), mean length,
the validation perplexity of the run's own evaluation (the real validation text, teacher-forced), and
what the NLL is made of: the student's entropy and its KL to the teacher on its own completions, beside
its KL to the teacher (and its perplexity) on the same documents' own next 64 tokens. On-policy steps
train where the student writes; what they can add to teacher-forced KD is the drift, the KL on its own
completions less the KL on the data.

Speed (``--speed``): one on-policy step of this project (``rollout.on_policy`` = ``--lam``) against TRL's
``GKDTrainer`` with the same lambda, new tokens (64), batch (16), temperature (1), JSD beta (0.5),
models and learning rate, each in its own process, float32, on this machine's CPU; step time is the mean
after the first fifth of ``--speed-steps`` steps, the generation share of each from its own clock (this
project's ``train/generation_time_share``; TRL: a wrapped ``generate_on_policy_outputs``). Both draw whole
steps with probability lambda, each from its own random stream, so each run has its own count of steps that
generated: the table also gives each at lambda exactly (the rest of a step + lambda x the generation of a
step that generated), and the ratio of those.

Needs ``distill prepare-tiny`` and, for TRL, ``pip install -e '.[bench]'``. Prints tables, writes JSON.

    python benchmarks/on_policy.py [--quality [--trl]] [--speed] [--steps 300] [--speed-steps 100] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
TINY = Path("~/.cache/distill/tiny").expanduser()  # distill prepare-tiny
TEACHER = TINY / "teacher"
TRAINED = TINY / "baseline" / "student"  # configs/tiny_on_policy.yaml's start: CE on the data
PROMPT, NEW = 32, 64
COMMON = ["data.packing=false", f"rollout.prompt_tokens={PROMPT}", f"rollout.max_new_tokens={NEW}", "train.eval_every=0", "train.save_every=0",
          "tracking.backend=none", "eval.speed=false", "eval.baseline=", "rollout.samples=0", "train.log_every=10"]
JSD = ["loss.kind=jsd", "loss.jsd_beta=0.5"]
ON_POLICY = {"lambda 0": [], "lambda 0.5": ["rollout.on_policy=0.5"], "lambda 0.5 per row": ["rollout.on_policy=0.5", "rollout.draw=row"],
             "lambda 1": ["rollout.on_policy=1"]}
DIVERGENCES = {"JSD": (JSD, 0.5), "reverse KL": (["loss.kind=reverse_kl"], 1.0)}  # this project's settings, and TRL's beta for the same divergence
FURTHER = ["student.architecture={}", "train.lr=1e-3", "train.warmup_steps=0", "eval.initial=false"]  # a trained student, trained further
ROWS = {"ce": ["loss.alpha=1.0"], **{name: [*JSD, *sets] for name, sets in ON_POLICY.items()}, "seq-KD ce": ["loss.alpha=1.0"], "seq-KD + JSD": JSD}


def distill(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "distill_launcher.cli", *args], check=True, cwd=REPO)


def _sets(values) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def held_out(tokenizer, count: int = 128) -> list[list[int]]:
    """The first PROMPT + NEW tokens of the first ``count`` validation documents longer than PROMPT + 8: their first PROMPT
    tokens are the held-out prompts, the rest the data's own continuation of each."""
    text = (TINY / "validation.txt").read_text()
    documents = []
    for doc in (d for d in text.split("\n\n") if d.strip()):
        ids = [tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) > PROMPT + 8:
            documents.append(ids[: PROMPT + NEW])
        if len(documents) == count:
            break
    return documents


def judged(student_dir: Path, teacher, tokenizer, documents) -> dict:
    """The student's sampled completions of the documents' prompts, judged by the teacher: per-token NLL, distinct-2, length;
    and what that NLL is made of (per token): the student's entropy and its KL to the teacher on its own completions, beside
    its KL to the teacher on the documents' own continuations (and its perplexity of them). On its own completions the
    teacher's NLL is the student's entropy + KL(student || teacher); on-policy steps train on exactly those positions, and
    what they add to teacher-forced KD is mostly the drift: that KL less the KL on the data's text."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.config import RolloutConfig
    from distill.generation import ENGINES

    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    engine = ENGINES["hf"](RolloutConfig(max_new_tokens=NEW, temperature=1.0), tokenizer=tokenizer, vocab=len(tokenizer))
    prompts = [d[:PROMPT] for d in documents]
    completions = []
    for i in range(0, len(prompts), 32):
        completions += engine.generate(student, prompts[i : i + 32], seed=1234 + i)
    own, data = Counter(), Counter()
    bigrams = []

    def score(ids: list[int]) -> Counter:
        """Sums over the tokens after the prompt: KL(student || teacher), each model's NLL of the tokens, the student's entropy."""
        x = torch.tensor([ids])
        log_s = torch.log_softmax(student(input_ids=x).logits[0, PROMPT - 1 : -1].float(), -1)
        log_t = torch.log_softmax(teacher(input_ids=x).logits[0, PROMPT - 1 : -1].float(), -1)
        targets = x[0, PROMPT:, None]
        return Counter({"kl": float((log_s.exp() * (log_s - log_t)).sum()), "teacher_nll": -float(log_t.gather(-1, targets).sum()),
                        "student_nll": -float(log_s.gather(-1, targets).sum()), "entropy": -float((log_s.exp() * log_s).sum()),
                        "tokens": len(ids) - PROMPT})

    with torch.no_grad():
        for prompt, completion, document in zip(prompts, completions, documents):
            data.update(score(document))
            if completion:
                own.update(score(prompt + completion))
                bigrams += list(zip(completion, completion[1:]))
    n, m = max(own["tokens"], 1), max(data["tokens"], 1)
    return {"teacher_nll": own["teacher_nll"] / n, "distinct_2": len(set(bigrams)) / max(len(bigrams), 1), "length": own["tokens"] / len(prompts),
            "entropy": own["entropy"] / n, "kl_own": own["kl"] / n, "kl_data": data["kl"] / m, "held_out_perplexity": math.exp(data["student_nll"] / m)}


def judge():
    """:func:`judged` with the teacher, its tokenizer and the held-out documents loaded once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    documents = held_out(tokenizer)

    def of(student_dir: Path, run: Path | None = None) -> dict:
        """``run``: the student's run, whose evaluation gives the validation perplexity."""
        row = judged(student_dir, teacher, tokenizer, documents)
        if run is not None:
            row["perplexity"] = perplexity(run, "student")
        return row

    return of


def perplexity(run: Path, model: str) -> float:
    """The validation perplexity of ``model`` (a row of the run's evaluation: student, teacher)."""
    return {r["model"]: r for r in json.loads((run / "eval.json").read_text())["rows"]}[model]["perplexity"]


def train(args, out: Path, sets: list[str], steps: int) -> None:
    if not (args.reuse and (out / "eval.json").is_file()):
        start = time.perf_counter()
        distill("run", str(CONFIG), "--overwrite", *_sets([*COMMON, f"train.max_steps={steps}", f"output_dir={out}", *sets]))
        print(f"{out.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)


def quality(args, work: Path, of) -> dict:
    completions = work / "teacher_completions"
    distill("generate-teacher", str(CONFIG), *_sets(["data.packing=false", f"rollout.prompt_tokens={PROMPT}", f"rollout.max_new_tokens={NEW}"]),
            "--out", str(completions))
    results = {"teacher": of(TEACHER)}
    for name, sets in ROWS.items():
        out = work / name.replace(" ", "_").replace("+", "plus")
        data = [f"data.train_files=[{completions}]", "data.prompt_field=prompt"] if name.startswith("seq-KD") else []
        train(args, out, [*data, *sets], args.steps)
        results[name] = of(out / "student", out)
        results["teacher"]["perplexity"] = perplexity(out, "teacher")
    return results


def continued(args, work: Path, of) -> dict:
    """GKD's own setting: a student that already writes sensible text (the ``lambda 0`` student of :func:`quality`)
    trained ``--more-steps`` further at lr 1e-3 with lambda 0, 0.5 and 1."""
    start = work / "lambda_0" / "student"
    results = {"start (lambda 0 student)": of(start, start.parent)}
    for name, sets in ON_POLICY.items():
        out = work / f"continued_{name.replace(' ', '_')}"
        train(args, out, [*JSD, *sets, f"student.path={start}", *FURTHER], args.more_steps)
        results[f"+{args.more_steps} steps, {name}"] = of(out / "student", out)
    return results


def from_trained(args, work: Path, of) -> dict:
    """The student ``configs/tiny_on_policy.yaml`` starts from (trained on the data alone by ``distill prepare-tiny``, as GKD's
    students are fine-tuned first), ``--steps`` steps at lr 1e-3 with JSD and with reverse KL at lambda 0, 0.5 and 1; with
    ``--trl``, TRL's ``GKDTrainer`` from the same student with the same steps, batches and lr (beta 0.5 and 1: its JSD and reverse
    KL) at lambda 0 and 0.5, to tell the method's figures from this implementation's."""
    results = {"start (the CE student)": of(TRAINED, TRAINED.parent)}
    for divergence, (loss, _) in DIVERGENCES.items():
        for lam in ("0", "0.5", "1"):
            out = work / f"trained_{divergence.replace(' ', '_')}_{lam}"
            train(args, out, [*loss, f"rollout.on_policy={lam}", f"student.path={TRAINED}", *FURTHER], args.steps)
            results[f"{divergence}, lambda {lam}"] = of(out / "student", out)
    for divergence, (_, beta) in DIVERGENCES.items() if args.trl else ():
        for lam in (0.0, 0.5):
            out = work / f"trained_trl_{divergence.replace(' ', '_')}_{lam:g}"
            if not (args.reuse and (out / "student").is_dir()):
                child = subprocess.run([sys.executable, __file__, "--child", "trl-quality", "--lam", str(lam), "--beta", str(beta),
                                        "--steps", str(args.steps), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
                if child.returncode != 0:
                    raise SystemExit(f"TRL's {divergence} row at lambda {lam:g} failed:\n{child.stderr[-3000:]}")
            results[f"TRL GKDTrainer: {divergence}, lambda {lam:g}"] = of(out / "student")
    return results


def _table(title: str, rows: dict, base: dict) -> None:
    print(f"\n| {title} | teacher NLL of its samples | vs reference | its entropy | KL on its samples | KL on the data | distinct-2 | length "
          "| validation ppl | vs reference | held-out ppl |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        ppl = f"{row['perplexity']:.2f} | {row['perplexity'] / base['perplexity'] - 1:+.1%}" if "perplexity" in row else "- | -"  # TRL's: no run of ours
        print(f"| {name} | {row['teacher_nll']:.3f} | {row['teacher_nll'] / base['teacher_nll'] - 1:+.1%} | {row['entropy']:.3f} | {row['kl_own']:.3f} | "
              f"{row['kl_data']:.3f} | {row['distinct_2']:.3f} | {row['length']:.1f} | {ppl} | {row['held_out_perplexity']:.2f} |")


def gkd_trainer(lam: float, steps: int, out: Path, *, beta: float = 0.5, student: Path | None = None, callbacks=()):
    """TRL's GKDTrainer on the same models, batches and settings as this project's run (the new student of configs/tiny.yaml at
    its lr and warm-up, or ``student`` trained further as :data:`FURTHER` trains it)."""
    import torch
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill import data, models
    from distill.config import load_config
    from distill.setup import Setup

    further = [f"student.path={student}", *FURTHER] if student else []
    cfg = load_config(str(CONFIG), [*COMMON, f"output_dir={out}", *further])
    setup = Setup(cfg, torch.device("cpu"), load_teacher=False)
    teacher = models.load_teacher(cfg.teacher, torch.device("cpu"))
    stream = data.TrainStream(setup.train_sequences, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.data.seed, pad_id=setup.tokenizer.pad_token_id)
    rows = [{"input_ids": r["input_ids"], "labels": [-100] * PROMPT + r["input_ids"][PROMPT:]}
            for b in (stream.next_batch() for _ in range(steps)) for r in ({"input_ids": ids[: int(m.sum())]} for ids, m in
                                                                            zip(b["input_ids"].tolist(), b["attention_mask"]))]
    pad = setup.tokenizer.pad_token_id

    def collate(batch):
        out = data.collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in batch], pad)
        prompts = [r["input_ids"][:PROMPT] for r in batch]  # left-padded, as TRL's chat collator makes them
        width = max(map(len, prompts))
        out["prompts"] = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        out["prompt_attention_mask"] = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return out

    args = GKDConfig(output_dir=str(out / "trl"), per_device_train_batch_size=cfg.train.micro_batch_size, max_steps=steps, learning_rate=cfg.train.lr,
                     lr_scheduler_type="cosine", warmup_steps=cfg.train.warmup_steps, weight_decay=0.0, max_grad_norm=cfg.train.max_grad_norm,
                     lmbda=lam, beta=beta, temperature=1.0, max_new_tokens=NEW, seq_kd=False, report_to=[], save_strategy="no", logging_steps=50,
                     use_cpu=True, dataloader_num_workers=0, max_length=cfg.data.seq_len, seed=cfg.train.seed, disable_dropout=True, bf16=False)
    trainer = GKDTrainer(model=setup.student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows), data_collator=collate,
                         processing_class=setup.tokenizer, callbacks=list(callbacks))
    return trainer, setup.tokenizer


def trl_child(lam: float, steps: int, out: Path) -> dict:
    """TRL's step time and generation share (its own clock around each step and each generation)."""
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDTrainer

    times, generation, marks = [], [], {}
    original = GKDTrainer.generate_on_policy_outputs

    def timed(*a, **k):
        start = time.perf_counter()
        result = original(*a, **k)
        generation.append(time.perf_counter() - start)
        return result

    GKDTrainer.generate_on_policy_outputs = staticmethod(timed)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks["start"], marks["generated"] = time.perf_counter(), len(generation)

        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter() - marks["start"], sum(generation[marks["generated"]:])))

    trainer, _ = gkd_trainer(lam, steps, out, callbacks=[Clock()])
    trainer.train()
    return _timing([(t, g, g > 0) for t, g in times[len(times) // 5 :]])


def trl_quality_child(lam: float, beta: float, steps: int, out: Path) -> dict:
    """TRL's GKDTrainer from :data:`TRAINED`; the student saved in ``out/student`` for :func:`judged`."""
    trainer, tokenizer = gkd_trainer(lam, steps, out, beta=beta, student=TRAINED)
    trainer.train()
    trainer.model.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")
    return {"student": str(out / "student")}


def distill_child(lam: float, steps: int, out: Path) -> dict:
    from distill.config import load_config
    from distill.job import run

    run(load_config(str(CONFIG), [*COMMON, *JSD, f"rollout.on_policy={lam}", f"train.max_steps={steps}", "train.log_every=1", "eval.at_end=false",
                                  f"output_dir={out}"]), overwrite=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in records if "train/step_seconds" in r][steps // 5 :]
    return _timing([(r["train/step_seconds"], r["train/generation_time_share"] * r["train/step_seconds"], r["train/on_policy_rows"] > 0) for r in kept])


def _timing(steps: list[tuple[float, float, bool]]) -> dict:
    """(step seconds, generation seconds, whether it generated) of each timed step: the mean step, the generation share, how many steps
    generated, and the two parts apart (a lambda draw gives each run its own count of generating steps)."""
    total, generation = sum(t for t, _, _ in steps), sum(g for _, g, _ in steps)
    generating = sum(1 for *_, generated in steps if generated)
    return {"seconds_per_step": total / len(steps), "generation_share": generation / total, "steps": len(steps), "generating_steps": generating,
            "generation_seconds_per_generating_step": generation / max(generating, 1), "other_seconds_per_step": (total - generation) / len(steps)}


def speed(args, work: Path) -> dict:
    results = {}
    for name in ("distill", "trl"):
        out = work / f"speed_{name}"
        child = subprocess.run([sys.executable, __file__, "--child", name, "--lam", str(args.lam), "--speed-steps", str(args.speed_steps),
                                "--out", str(out)], cwd=REPO, capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"the {name} row failed:\n{child.stderr[-3000:]}")
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
    for r in (results["distill"], results["trl"]):  # each run's draws gave it its own count of generating steps: both at lambda exactly
        r["seconds_per_step_at_lambda"] = r["other_seconds_per_step"] + args.lam * r["generation_seconds_per_generating_step"]
    results["ratio"] = results["distill"]["seconds_per_step"] / results["trl"]["seconds_per_step"]
    results["ratio_at_lambda"] = results["distill"]["seconds_per_step_at_lambda"] / results["trl"]["seconds_per_step_at_lambda"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--speed-steps", type=int, default=100)
    parser.add_argument("--more-steps", type=int, default=150, help="steps of the continued rows (from the lambda 0 student)")
    parser.add_argument("--lam", type=float, default=0.5, help="the lambda of the speed comparison")
    parser.add_argument("--trl", action="store_true", help="with --quality: TRL's GKDTrainer from the CE student beside this project's")
    parser.add_argument("--beta", type=float, default=0.5, help=argparse.SUPPRESS)
    parser.add_argument("--reuse", action="store_true", help="read back quality runs already finished")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--child", choices=["distill", "trl", "trl-quality"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        if args.child == "trl-quality":
            print(json.dumps(trl_quality_child(args.lam, args.beta, args.steps, args.out)))
            return
        child = {"distill": distill_child, "trl": trl_child}[args.child]
        print(json.dumps(child(args.lam, args.speed_steps, args.out)))
        return
    work = args.out / "on_policy_runs"
    work.mkdir(parents=True, exist_ok=True)
    report = {"steps": args.steps, "prompt_tokens": PROMPT, "new_tokens": NEW}
    if args.quality:
        of = judge()
        report["quality"] = q = quality(args, work, of)
        _table(f"from a new student, {args.steps} steps (reference: lambda 0)", q, q["lambda 0"])
        report["continued"] = c = continued(args, work, of)
        _table(f"from the lambda 0 student, {args.more_steps} more steps (reference: lambda 0)", c, c[f"+{args.more_steps} steps, lambda 0"])
        report["from_trained"] = t = from_trained(args, work, of)
        for divergence in DIVERGENCES:
            _table(f"from the CE student, {args.steps} steps, {divergence} (reference: its lambda 0)",
                   {k: v for k, v in t.items() if k.startswith("start") or f"{divergence}," in k},
                   t[f"{divergence}, lambda 0"])
    if args.speed:
        report["speed"] = s = speed(args, work)
        print(f"\n| on-policy step, lambda {args.lam:g}, {NEW} new tokens, batch 16 | seconds a step | generation share | steps that generated "
              "| generation s a generating step | the rest, s a step | s a step at lambda exactly |")
        print("|---|---|---|---|---|---|---|")
        for name in ("distill", "trl"):
            r = s[name]
            print(f"| {name} | {r['seconds_per_step']:.3f} | {r['generation_share']:.0%} | {r['generating_steps']}/{r['steps']} "
                  f"| {r['generation_seconds_per_generating_step']:.3f} | {r['other_seconds_per_step']:.3f} | {r['seconds_per_step_at_lambda']:.3f} |")
        print(f"| ratio (distill / TRL) | {s['ratio']:.2f}x | | | | | {s['ratio_at_lambda']:.2f}x |")
    path = args.out / "on_policy.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{path}")


if __name__ == "__main__":
    main()

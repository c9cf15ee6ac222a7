"""On-policy distillation (``rollout.*``): the student writes the completions of the on-policy share of
each step's prompts, the teacher scores them, and the targets are what follows the prompts only."""

import json

import pytest
import torch

from conftest import read_metrics, reset_accelerate, run_job
from distill import data
from distill.config import ConfigError, DataConfig, RolloutConfig, load_config
from distill.losses import IGNORE_INDEX
from distill.rollout import Rollouts, prompt_length

ON_POLICY = ("data.packing=false", "rollout.max_new_tokens=24", "rollout.prompt_tokens=8")


def _rows(tiny, texts, prompts=None):
    from datasets import Dataset

    columns = {"text": texts, **({"prompt": prompts} if prompts else {})}
    cfg = DataConfig(seq_len=40, packing=False, prompt_field="prompt" if prompts else None)
    return data.tokenize(Dataset.from_dict(columns), tiny["tokenizer"], cfg, "training")


def test_a_rows_prompt_is_its_masked_prefix_else_its_first_tokens(tiny):
    tokenizer = tiny["tokenizer"]
    prompted = _rows(tiny, ["return the first item"], ["def first(items):"])[0]
    plain = _rows(tiny, ["def first(items):\n    return items[0]\n" * 3])[0]
    lead = 1  # BOS
    cut = prompt_length(prompted["labels"], length=len(prompted["input_ids"]), lead=lead, prompt_tokens=8)
    assert tokenizer.decode(prompted["input_ids"][lead:cut]) == "def first(items):"
    assert prompt_length(plain["labels"], length=len(plain["input_ids"]), lead=lead, prompt_tokens=8) == 8
    assert prompt_length(plain["labels"][:5], length=5, lead=lead, prompt_tokens=8) == 5  # a row shorter than the prompt is all prompt
    # A conversation: everything before its last assistant turn.
    from test_chat import CONVERSATION, TEMPLATE

    ids, labels = data._conversation_ids(tokenizer, CONVERSATION, TEMPLATE, 0)
    cut = prompt_length(labels, length=len(ids), lead=0, prompt_tokens=8)
    assert tokenizer.decode(ids[:cut]).endswith("And glob?</s>\n<|assistant|>\n")
    assert tokenizer.decode(ids[cut:]) == "It finds path names matching a pattern.</s>\n"


def _greedy(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """The greedy continuation, one full forward per token: no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == eos:
                break
    return ids[len(prompt):]


def test_the_student_completes_its_share_of_rows_and_only_the_completions_are_targets(tiny, corpus):
    from transformers import AutoModelForCausalLM

    tokenizer = tiny["tokenizer"]
    student = AutoModelForCausalLM.from_pretrained(tiny["student"]).train()
    texts = [line for line in open(corpus["train"]).read().split("\n\n") if len(line) > 80][:12]
    sequences = _rows(tiny, texts)
    batches = [data.collate([sequences[i] for i in range(j, j + 6)], tokenizer.pad_token_id, [(0, i) for i in range(j, j + 6)]) for j in (0, 6)]
    greedy = RolloutConfig(on_policy=0.5, max_new_tokens=12, temperature=0.0, prompt_tokens=8, draw="row")
    rollouts = Rollouts(greedy, tokenizer=tokenizer, vocab=len(tokenizer), seed=0)
    state = torch.random.get_rng_state()
    out = rollouts.apply(student, batches, step=3, rank=0)
    assert torch.equal(torch.random.get_rng_state(), state) and student.training  # the training's random state and mode are left as they were
    chosen = [rollouts.on_policy(3, 0, i) for i in range(12)]
    assert 2 <= sum(chosen) <= 10 and chosen != [rollouts.on_policy(4, 0, i) for i in range(12)]  # drawn per (step, row)
    completions = 0
    for i, (ids, labels, mask) in enumerate(zip(*(torch.cat([b[k] for b in out]).tolist() for k in ("input_ids", "labels", "attention_mask")))):
        n = sum(mask)
        ids, labels, original = ids[:n], labels[:n], sequences[i]["input_ids"]
        assert ids[:8] == original[:8]  # the prompt
        if chosen[i]:  # the student's greedy continuation, as full forwards without a cache or padding compute it; the prompt is no target
            assert ids[8:] == _greedy(student, original[:8], 12, tokenizer.eos_token_id) == labels[8:] and labels[:8] == [IGNORE_INDEX] * 8
            completions += 1
        else:  # the data as it is
            assert ids == original and labels == sequences[i]["labels"]
    assert rollouts.metrics(10.0)["train/completion_length"] == 12 and completions == sum(chosen)
    # rollout.draw=step (the default, GKD's): a drawn step has every row written, another none, and nothing is generated for it.
    whole = Rollouts(RolloutConfig(on_policy=0.5, max_new_tokens=12, prompt_tokens=8), tokenizer=tokenizer, vocab=len(tokenizer), seed=0)
    drawn = [whole.on_policy(step, 0, 0) for step in range(40)]
    assert 10 <= sum(drawn) <= 30 and all(whole.on_policy(step, s, i) == drawn[step] for step in range(40) for s in (0, 1) for i in range(12))
    for step in (drawn.index(True), drawn.index(False)):
        written = whole.apply(student, batches, step=step, rank=0)
        assert whole.metrics(1.0)["train/on_policy_rows"] == float(drawn[step])
        assert drawn[step] != all(torch.equal(w[k], b[k]) for w, b in zip(written, batches) for k in ("input_ids", "labels"))
    # Sampling: the same step writes the same completions (a resumed step), another step others.
    sampled = Rollouts(RolloutConfig(on_policy=1.0, max_new_tokens=12, prompt_tokens=8), tokenizer=tokenizer, vocab=len(tokenizer), seed=0)
    first = sampled.apply(student, batches, step=3, rank=0)[0]["input_ids"]
    assert torch.equal(first, sampled.apply(student, batches, step=3, rank=0)[0]["input_ids"])
    assert not torch.equal(first, sampled.apply(student, batches, step=4, rank=0)[0]["input_ids"])
    # Ids past the shared vocabulary are never written.
    narrow = Rollouts(RolloutConfig(on_policy=1.0, max_new_tokens=12, prompt_tokens=8), tokenizer=tokenizer, vocab=100, seed=0)
    written = narrow.apply(student, batches, step=3, rank=0)[0]
    assert int(written["input_ids"][:, 8:][written["attention_mask"][:, 8:] == 1].max()) < 100


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_every_divergence_trains_on_the_students_own_completions(tiny, corpus, tmp_path, divergence):
    out, _ = run_job(tiny, corpus, tmp_path / "run", *ON_POLICY, "rollout.on_policy=1", f"loss.kind={divergence}", "train.max_steps=10",
                     "eval.at_end=false")
    records = read_metrics(out)
    kd = [r["train/kd_loss"] for r in records]
    assert sum(kd[-3:]) < 0.92 * sum(kd[:3]), kd
    assert all(0 < r["train/completion_length"] <= 24 and r["train/on_policy_rows"] == 1 and 0 < r["train/generation_time_share"] < 1 for r in records), records


def test_half_on_policy_with_prompts_reports_its_samples(tiny, corpus, tmp_path):
    """rollout.on_policy=0.5 on prompt/completion rows, a W&B run and TensorBoard: the student's sample completions at each
    evaluation in samples.jsonl, a W&B table, a TensorBoard text and the report."""
    from conftest import read_wandb_records

    rows = tmp_path / "pairs.jsonl"
    paragraphs = [p for p in open(corpus["train"]).read().split("\n\n") if len(p) > 60]
    rows.write_text("".join(json.dumps({"prompt": p[:40], "text": p[40:200]}) + "\n" for p in paragraphs))
    out, result = run_job(tiny, corpus, tmp_path / "run", *ON_POLICY, "rollout.on_policy=0.5", "data.prompt_field=prompt",
                          f"data.train_files=[{rows}]", f"data.validation_files=[{rows}]", "rollout.samples=2", "train.eval_every=3",
                          "tracking.backend=[wandb,tensorboard]", "eval.speed=false")
    share = [r["train/on_policy_rows"] for r in read_metrics(out) if "train/on_policy_rows" in r]
    assert 0.2 < sum(share) / len(share) < 0.8
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [3, 3, 6, 6]
    assert samples[0]["prompt"] == paragraphs[0][:40].strip() or samples[0]["prompt"].startswith(paragraphs[0][:20])
    report = (out / "report.md").read_text()
    assert "## The student's completions at step 6" in report and samples[2]["completion"].split("\n")[0].replace("|", "\\|") in report
    assert b"samples/completions" in b"".join(p.read_bytes() for p in (out / "tensorboard").rglob("events.*"))
    assert "samples/completions" in json.dumps([str(r) for r in read_wandb_records(out)])


def test_what_cannot_give_on_policy_targets_is_one_line_before_step_0(tiny, corpus, tmp_path):
    from distill.job import run

    sets = lambda *extra: [*__import__("conftest").job_overrides(tiny, corpus, tmp_path / "run"), *ON_POLICY, "rollout.on_policy=0.5", *extra]
    for extra, message in [(("rollout.max_new_tokens=0",), "rollout.max_new_tokens must be an integer >= 1"),
                           (("data.packing=true",), "rollout.on_policy needs data.packing=false"),
                           (("task.kind=masked_lm",), "task.kind=masked_lm has none")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, sets(*extra))
    for extra, message in [(("teacher.source=cache",), "teacher.source=cache cannot score completions the student has just written"),
                           (("rollout.engine=vllm",), "rollout.engine=vllm needs a CUDA GPU"),
                           (("rollout.max_new_tokens=250",), "rollout.max_new_tokens=250 after prompts of up to 8 tokens exceeds the student's context of 256")]:
        reset_accelerate()
        with pytest.raises(ConfigError, match=message):
            run(load_config(None, sets(*extra)))
        assert not (tmp_path / "run").exists()  # nothing written
    empty = tmp_path / "empty_prompt.jsonl"
    empty.write_text(json.dumps({"prompt": "x = 1", "text": "y = 2 " * 20}) + "\n" + json.dumps({"prompt": "", "text": "z = 3 " * 20}) + "\n")
    reset_accelerate()
    with pytest.raises(ConfigError, match="1 training row has an empty data.prompt_field"):
        run(load_config(None, sets("data.prompt_field=prompt", f"data.train_files=[{empty}]", f"data.validation_files=[{empty}]")))
    assert not (tmp_path / "run").exists()


def test_a_lora_student_writes_with_its_adapters(tiny, corpus, tmp_path):
    """peft's generate runs the base with the adapters: what the student writes changes as the adapters train."""
    out, _ = run_job(tiny, corpus, tmp_path / "run", *ON_POLICY, "rollout.on_policy=1", "rollout.temperature=0", f"student.path={tiny['student']}",
                     "student.architecture={}", "student.lora={r: 4}", "train.lr=3e-2", "train.max_steps=8", "rollout.samples=2", "train.eval_every=2",
                     "eval.at_end=false")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    by_step = {}
    for row in samples:
        by_step.setdefault(row["step"], []).append(row["completion"])
    assert sorted(by_step) == [2, 4, 6, 8] and by_step[2] != by_step[8]  # greedy: only new weights change what is written
    kd = [r["train/kd_loss"] for r in read_metrics(out) if "train/kd_loss" in r]
    assert sum(kd[-3:]) < sum(kd[:3]), kd

"""A teacher of another tokenizer: tokens matched by the characters they cover, the vocabularies mapped, the terms
compared group by group (distill.pairing, distill.aligned_terms), and a job that trains across tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from distill.errors import ConfigError
from distill.pairing import NO_GROUP, Pairing, _style, blocks, char_ends, concatenate, groups, surface, token_texts

TEXTS = [
    "    return x  + 12345 # naïve café — ü\n\tz",
    "def f(a, b):\n    '''Sum.'''\n    return a+b\n\n\n# 3.14159 and 2718281828",
    "x",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, corpus, tiny):
    """The tiny teacher's BPE, a byte-level tokenizer (no merges) and a SentencePiece BPE with byte fallback, all trained on the corpus."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    from distill.tiny import train_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    byte_level = train_tokenizer(Path(corpus["train"]), root / "bytes", vocab_size=259)
    spm.SentencePieceTrainer.train(input=corpus["train"], model_prefix=str(root / "sp"), vocab_size=600, byte_fallback=True,
                                   character_coverage=0.9995, model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2, bos_id=1, eos_id=2, unk_id=0, pad_id=3, max_sentence_length=100000, split_digits=True,
                                   allow_whitespace_only_pieces=True)
    (root / "sentencepiece").mkdir()
    shutil.copy(root / "sp.model", root / "sentencepiece" / "tokenizer.model")
    sentencepiece = LlamaTokenizer.from_pretrained(root / "sentencepiece", legacy=False)
    sentencepiece.save_pretrained(root / "sentencepiece")
    return {"root": root, "bpe": tiny["tokenizer"], "bytes": byte_level, "sentencepiece": sentencepiece}


def test_groups_close_where_both_tokenizations_end_at_one_character():
    # One number: one token against five (and five against one).
    assert groups([5], [1, 2, 3, 4, 5]) == [(0, 1, 0, 5)]
    assert groups([1, 2, 3, 4, 5], [5]) == [(0, 5, 0, 1)]
    # "aéb": the student writes é as two byte tokens (both end where é ends), the teacher "aé" as one.
    assert groups([1, 2, 2, 3], [2, 3]) == [(0, 3, 0, 1), (3, 4, 1, 2)]
    # Crossing splits ("ab|cd|e" against "a|bcd|e") merge until both agree; text one side has beyond the other is in no group.
    assert groups([2, 4, 5], [1, 4, 5, 7]) == [(0, 2, 0, 2), (2, 3, 2, 3)]
    # A zero-width token (a trimmed space) goes with the group that ends where it does.
    assert groups([3, 3, 7], [3, 7]) == [(0, 2, 0, 1), (2, 3, 1, 2)]


@pytest.mark.parametrize("student", ["bytes", "sentencepiece"])
def test_each_group_holds_the_same_text_on_both_sides(tokenizers, student):
    pairing = Pairing(tokenizers[student], tokenizers["bpe"])
    for text in TEXTS:
        doc = pairing.document([("# prompt: ", False), (text, True)], "data.text_field")
        # Each model's own BOS opens its side and is in no group; the EOS of both is the last group.
        assert doc.ids[0] == tokenizers[student].bos_token_id and doc.groups[0] == NO_GROUP and doc.teacher_groups[0] == NO_GROUP
        assert doc.groups[-1] == doc.teacher_groups[-1] != NO_GROUP and doc.labels[-1] == tokenizers[student].eos_token_id
        # The prompt's tokens are no target; every group's tokens spell the same bytes on both sides.
        texts = {}
        for side, ids, group_ids, tokenizer in (("s", doc.ids, doc.groups, tokenizers[student]), ("t", doc.teacher_ids, doc.teacher_groups, tokenizers["bpe"])):
            style = _style(tokenizer)
            for i, g in zip(ids, group_ids):
                if g != NO_GROUP and i not in tokenizer.all_special_ids:
                    texts.setdefault((side, g), b"")
                    texts[(side, g)] += surface(tokenizer.convert_ids_to_tokens(i), style)
        assert {g for _, g in texts} == set(range(max(g for _, g in texts) + 1))
        for (side, g), spelled in texts.items():
            if side == "s":
                other = texts[("t", g)]
                # SentencePiece writes the text's first space as its prefix marker ("▁def" at the start is "def").
                assert spelled.lstrip(b" ") == other.lstrip(b" "), (g, spelled, other)
        assert b"".join(texts[("t", g)] for g in sorted(g for s, g in texts if s == "t")) == ("# prompt: " + text).encode()
    # Digits: the SentencePiece model splits every digit, the BPE keeps several together: one group of several tokens.
    if student == "sentencepiece":
        doc = pairing.document([("x = 2718281828", True)], "k")
        sizes = [(doc.groups.count(g), doc.teacher_groups.count(g)) for g in set(doc.groups) - {NO_GROUP}]
        assert any(s > t for s, t in sizes)


def test_a_side_without_bos_or_eos_leaves_that_token_out_of_every_group(tokenizers):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizers["bytes"].backend_tokenizer, pad_token="<pad>")  # no BOS, no EOS
    doc = Pairing(bare, tokenizers["bpe"]).document([("return 1", True)], "k")
    assert doc.teacher_ids[0] == tokenizers["bpe"].bos_token_id and doc.teacher_groups[0] == NO_GROUP
    assert doc.ids[-1] != tokenizers["bpe"].eos_token_id and doc.teacher_groups[-1] == NO_GROUP  # the teacher's EOS: nothing to match
    assert doc.groups[0] != NO_GROUP  # the student's first token is text


def test_slow_tokenizers_are_matched_by_their_decoding_or_refused(tokenizers):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    fast = tokenizers["sentencepiece"]
    slow = SentencePieceBackend(vocab_file=str(tokenizers["root"] / "sp.model"), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert not slow.is_fast
    text = "def f(a, b):    return a + b  # 31415"
    assert char_ends(slow, text, "k") == char_ends(fast, text, "k")  # decoded prefix by prefix: the fast tokenizer's offsets
    with pytest.raises(ConfigError, match="student tokenizer: the tokenizer \\(SentencePieceBackend\\) gives no character offsets and its "
                                          "decoding does not give the text back"):
        char_ends(slow, "naïve\n", "student tokenizer")  # its decoding writes the bytes as <0xC3>...


def test_packed_blocks_keep_only_groups_whole_on_both_sides(tokenizers, corpus):
    pairing = Pairing(tokenizers["bytes"], tokenizers["bpe"])
    paragraphs = [p for p in Path(corpus["validation"]).read_text().split("\n\n") if p.strip()][:12]
    joined = concatenate([pairing.document([(p, True)], "k") for p in paragraphs])
    rows = blocks(joined, [(i, i + 64) for i in range(0, len(joined) - 64, 64)], 40)
    kept = 0
    for row in rows:
        assert len(row["teacher_input_ids"]) <= 40
        for g in set(row["groups"]) - {NO_GROUP}:
            s = [i for i, h in zip(row["input_ids"], row["groups"]) if h == g]
            t = [i for i, h in zip(row["teacher_input_ids"], row["teacher_groups"]) if h == g]
            assert tokenizers["bytes"].decode(s) == tokenizers["bpe"].decode(t)
            kept += 1
        assert sorted(set(row["groups"]) - {NO_GROUP}) == list(range(len(set(row["groups"]) - {NO_GROUP})))  # numbered from 0 in each row
        assert set(row["groups"]) - {NO_GROUP} == set(row["teacher_groups"]) - {NO_GROUP}
    assert kept > 10 * len(rows)


def test_the_shared_vocabulary_undoes_space_markers(tokenizers):
    sp, bpe = tokenizers["sentencepiece"], tokenizers["bpe"]
    student_ids, teacher_ids = Pairing(sp, bpe).shared
    pairs = dict(zip(student_ids, teacher_ids))
    both = {t.replace("▁", " ") for t in sp.get_vocab()} & {bpe.convert_tokens_to_string([t]) for t in bpe.get_vocab()}
    word = next(w for w in sorted(both) if w.startswith(" ") and len(w) > 3)
    assert bpe.convert_tokens_to_string([bpe.convert_ids_to_tokens(pairs[sp.convert_tokens_to_ids(word.replace(" ", "▁"))])]) == word
    assert pairs[sp.eos_token_id] == bpe.eos_token_id and pairs[sp.bos_token_id] == bpe.bos_token_id
    byte_level = Pairing(tokenizers["bytes"], bpe)
    assert len(byte_level.shared[0]) == 256 + 2  # every byte, BOS and EOS
    # Every longer teacher token is folded into the byte it starts with (the byte-level student's first token of its text).
    teacher_bytes = token_texts(bpe)
    longer = [i for i, text in teacher_bytes.items() if len(text) > 1]
    assert sorted(byte_level.folds[1]) == sorted(longer)
    for i in longer:
        k = byte_level.folds[1][i]
        assert teacher_bytes[byte_level.shared[1][k]] == teacher_bytes[i][:1]


# ----------------------------------------------------------------------------- the terms


SHARED = ([1, 2, 3, 4, 5, 6, 7], [2, 3, 4, 5, 9, 10, 12])  # ids 0, 8, 9, 10 of the student and 0, 1, 6, 7, 8, 11 of the teacher are not shared
FOLDS = ({8: 0}, {6: 2, 7: 2})  # unshared tokens that start with a shared one (its place in SHARED): student 8 with 1, teacher 6 and 7 with 4


def _paired_batch(seed: int = 0):
    """Two rows: student [B, 7] and teacher [B, 6] tokens with groups of 1-1, 2-1, 1-2, 1-3 tokens, a masked target, padding."""
    from distill.aligned_terms import Paired

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 11, (2, 7), generator=g)
    teacher_ids = torch.randint(3, 13, (2, 6), generator=g)
    for position in (1, 5):  # row 0's groups of one token on both sides (0 and 3) hold one text: the same token where both vocabularies have it
        student_id = int(ids[0, position])
        teacher_ids[0, position] = dict(zip(*SHARED)).get(student_id, 11)
    groups_ = torch.tensor([[-1, 0, 1, 1, 2, 3, 4], [-1, 0, 0, 1, 2, 2, -1]])
    teacher_groups = torch.tensor([[-1, 0, 1, 2, 2, 3], [-1, 0, 1, 1, 1, 2]])
    weights = torch.ones(2, 7)
    weights[1, 4:] = 0  # the second row's last target (token 5) is masked: its group 2 is not compared
    student_logits = torch.randn(2, 6, 11, generator=g, dtype=torch.float64)
    teacher_logits = torch.randn(2, 5, 13, generator=g, dtype=torch.float64)
    return student_logits, Paired(teacher_logits, teacher_ids, teacher_groups, ids, groups_), weights


def _reference_groups(student_logits, paired, weights, temperature):
    """Each compared group's two sides by the definition, one group at a time in float64: (log-probabilities before the
    group, its first actual token, the log-probability of its later tokens)."""
    out = []
    for b in range(student_logits.shape[0]):
        for g in range(int(paired.groups[b].max()) + 1):
            s = [i for i in range(paired.groups.shape[1]) if paired.groups[b, i] == g]
            t = [j for j in range(paired.teacher_groups.shape[1]) if paired.teacher_groups[b, j] == g]
            if not s or not t or s[0] == 0 or t[0] == 0 or any(weights[b, i - 1] == 0 for i in s):
                continue
            sides = []
            for logits, ids, positions in ((student_logits[b], paired.ids[b], s), (paired.logits[b], paired.teacher_ids[b], t)):
                log_p = torch.log_softmax(logits / temperature, dim=-1)
                sides.append((log_p[positions[0] - 1], int(ids[positions[0]]), sum((log_p[i - 1, ids[i]] for i in positions[1:]), torch.zeros((), dtype=log_p.dtype))))
            out.append(sides)
    return out


def _reference_bins(log_p, first, later, ids, other_single_index, fold):
    """The shared tokens, the group's text and the rest: the text's probability taken out of the first token's entry, each
    unshared token's mass in the shared token it starts with (``fold``), and (where the other side's group is one shared
    token and this side's is not) that token's entry added to the text's."""
    p = log_p.exp()
    text = p[first] * later.exp()
    kept = p.clone()
    kept[first] = p[first] - text
    shared = kept[ids].clone()
    for i, k in fold.items():
        shared[k] = shared[k] + kept[i]
    if other_single_index is not None and float(later) != 0:
        text = text + shared[other_single_index]
        shared[other_single_index] = 0
    log_shared = torch.where(shared > 0, shared, torch.ones_like(shared)).log()
    log_shared = torch.where(shared > 0, log_shared, torch.full_like(shared, -1e4))
    return torch.cat([log_shared, text.log().unsqueeze(0), (1 - shared.sum() - text).log().unsqueeze(0)]), kept


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_the_aligned_term_equals_its_definition_and_its_gradient(kind):
    from distill.aligned_terms import AlignedLogitsTerm, UldTerm
    from distill.losses import divergence
    from distill.objective import Outputs

    student_logits, paired, weights = _paired_batch()
    shared = SHARED
    temperature = 2.0
    term = AlignedLogitsTerm("kd", 1.0, divergence_kind=kind, temperature=temperature, jsd_beta=0.5, skew_alpha=0.1, shared=shared,
                             student_width=11, teacher_width=13, unshared=0.7, folds=FOLDS)
    uld = UldTerm("uld", 1.0, temperature=temperature, student_width=11, teacher_width=13)
    logits = student_logits.clone().requires_grad_(True)
    value = term(Outputs(logits=logits), Outputs(paired=paired), weights)
    (grad,) = torch.autograd.grad(value, logits)

    reference_logits = student_logits.clone().requires_grad_(True)
    groups_ = _reference_groups(reference_logits, paired, weights, temperature)
    assert len(groups_) == 6  # row 0: groups 0-3 (1-1, 2-1, 1-2, 1-1; 4 has no teacher token); row 1: 0 (2-1), 1 (1-3)
    fn, total = divergence(kind, temperature=1.0), 0.0
    for (s_log, s_first, s_later), (t_log, t_first, t_later) in groups_:
        single_index = lambda first, later, ids: ids.index(first) if float(later) == 0 and first in ids else None
        s_bins, s_kept = _reference_bins(s_log, s_first, s_later, shared[0], single_index(t_first, t_later, shared[1]), FOLDS[0])
        t_bins, t_kept = _reference_bins(t_log, t_first, t_later, shared[1], single_index(s_first, s_later, shared[0]), FOLDS[1])
        assert abs(float(s_bins.exp().sum()) - 1) < 1e-9 and abs(float(t_bins.exp().sum()) - 1) < 1e-9  # two proper distributions
        total = total + fn(s_bins, t_bins)
        s_only = s_kept[[i for i in range(11) if i not in shared[0] and i not in FOLDS[0]]].sort(descending=True).values
        t_only = t_kept[[i for i in range(13) if i not in shared[1] and i not in FOLDS[1]]].sort(descending=True).values
        total = total + 0.7 * (torch.nn.functional.pad(s_only, (0, 1)) - t_only).abs().sum()
    (reference_grad,) = torch.autograd.grad(total, reference_logits)
    # The term computes in float32 whatever the logits' dtype (as every term does); the reference in float64.
    torch.testing.assert_close(value.double(), total, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-6)

    # Free student logits trained on the term alone move towards the teacher: the divergence falls by more than 40% (merged groups share positions with others, so it cannot reach 0).
    free = torch.zeros_like(student_logits, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([free], lr=0.1)
    start = None
    for _ in range(200):
        loss = term(Outputs(logits=free), Outputs(paired=paired), weights)
        start = float(loss) if start is None else start
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.6 * start

    uld_value = uld(Outputs(logits=student_logits), Outputs(paired=paired), weights)
    merged = [((s_log + s_later).exp(), (t_log + t_later).exp()) for (s_log, _, s_later), (t_log, _, t_later)
              in _reference_groups(student_logits, paired, weights, temperature)]  # GOLD's merge: every entry times the later tokens'
    assert all(s.sum() <= 1 + 1e-12 and t.sum() <= 1 + 1e-12 for s, t in merged)
    expected = sum((torch.nn.functional.pad(s.sort(descending=True).values, (0, 2)) - t.sort(descending=True).values).abs().sum() for s, t in merged)
    torch.testing.assert_close(uld_value.double(), expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- the job


def test_a_job_distills_a_teacher_of_another_tokenizer(tiny, corpus, tokenizers, tmp_path):
    """The tiny teacher's BPE against a byte-level student: the job pairs them instead of refusing, trains every term, says
    how many targets were matched, and compares the models by bits per byte."""
    from conftest import read_metrics, run_job

    terms = ("loss.terms=[{kind: logits, name: kd, divergence: jsd, weight: 0.5}, {kind: uld, name: uld, weight: 0.5}, "
             "{kind: ce, name: ce, weight: 0.5}]")
    out, result = run_job(tiny, corpus, tmp_path / "run", f"student.tokenizer={tokenizers['root'] / 'bytes'}", terms, "train.max_steps=8",
                          "train.eval_every=4")
    steps = [m for m in read_metrics(out) if "train/loss" in m]
    assert len(steps) == 8 and all(m["train/kd_loss"] > 0 and m["train/uld_loss"] > 0 for m in steps)
    rows = {r["model"]: r for r in result["rows"]}
    assert all(r["bits_per_byte"] > 0 for r in rows.values()) and "kl_to_teacher" not in rows["student"]  # no position-wise comparison
    assert rows["teacher"]["tokens"] < rows["student"]["tokens"]  # each on its own tokens: the teacher's BPE needs fewer
    pairing = result["pairing"]
    assert pairing["student_vocabulary"] == 259 and pairing["shared_tokens"] == 258 and 0.9 < pairing["aligned_targets"] / pairing["targets"] <= 1
    report = (out / "report.md").read_text()
    assert "pairing: the teacher tokenizes differently" in report and "bits per byte:" in report
    saved = json.loads((out / "student" / "config.json").read_text())
    assert saved["vocab_size"] == 259 and json.loads((out / "student" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out / "student")) == 259  # the student keeps its own tokenizer


@pytest.mark.parametrize("extra, fragments", [
    (["loss.terms=[{kind: hidden, name: h, layers: [[1, 2]]}, {kind: ce, name: ce}]"], ["loss.terms[0]: a hidden term compares", "tokenize"]),
    (["rollout.on_policy=0.5", "data.packing=false", "data.messages_field=messages"],
     ["rollout.on_policy=0.5 with conversations", "use rollout.on_policy=0 or text rows"]),
    (["loss.fused=always"], ["loss.fused=always", "set loss.fused=auto or never"]),
])
def test_what_a_teacher_of_another_tokenizer_cannot_do_is_refused_before_step_0(tiny, corpus, tokenizers, tmp_path, capsys, extra, fragments):
    from test_bad_input import cli_run, expect_error

    out = tmp_path / "r"
    expect_error(capsys, cli_run(tiny, corpus, out, f"student.tokenizer={tokenizers['root'] / 'bytes'}", *extra), *fragments)
    assert not (out / "metrics.jsonl").exists()


def test_a_uld_term_without_a_teacher_of_another_tokenizer_is_refused(tiny, corpus, tmp_path, capsys):
    from test_bad_input import cli_run, expect_error

    expect_error(capsys, cli_run(tiny, corpus, tmp_path / "r", "loss.terms=[{kind: uld, name: u}, {kind: ce, name: ce}]"),
                 "loss.terms[0]: a uld term compares a teacher and a student that tokenize differently", "use kind: logits")


from test_chat import TEMPLATE as STUDENT_TEMPLATE  # noqa: E402  (the chat tests' template: each model renders its own)

TEACHER_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
                    "{% if add_generation_prompt %}### assistant: {% endif %}")
CONVERSATION = [
    {"role": "user", "content": "What does shlex.split do?"},
    {"role": "assistant", "content": "It splits a string like a shell would: 'a b' -> ['a', 'b']."},
    {"role": "user", "content": "And glob?"},
    {"role": "assistant", "content": "It finds path names matching a pattern, such as *.py (42 files)."},
]


def test_a_conversation_is_rendered_by_each_models_template_and_matched_turn_by_turn(tokenizers):
    pairing = Pairing(tokenizers["bytes"], tokenizers["bpe"])
    doc = pairing.conversation(CONVERSATION, (STUDENT_TEMPLATE, TEACHER_TEMPLATE), 0)
    student, teacher = tokenizers["bytes"], tokenizers["bpe"]
    # The student's targets are its assistant turns, closing marker included; the teacher's rendering is its own.
    targets = student.decode([i for i, label in zip(doc.ids, doc.labels) if label != -100])
    assert targets == "".join(m["content"] + "</s>\n" for m in CONVERSATION if m["role"] == "assistant")
    assert teacher.decode(doc.teacher_ids).startswith("### user: What does shlex.split do?\n\n### assistant: It splits")
    spelled = lambda ids, group_ids, tokenizer, g: tokenizer.decode([i for i, h in zip(ids, group_ids) if h == g])
    groups_ = sorted(set(doc.groups) - {NO_GROUP})
    assert groups_ == sorted(set(doc.teacher_groups) - {NO_GROUP})
    texts = [(spelled(doc.ids, doc.groups, student, g), spelled(doc.teacher_ids, doc.teacher_groups, teacher, g)) for g in groups_]
    closing = [(s, t) for s, t in texts if s != t]
    assert closing == [("</s>\n", "\n\n"), ("</s>\n", "\n\n")]  # each turn's end: whatever each template writes, one group
    matched = "".join(s for s, t in texts if s == t)
    for message in CONVERSATION:
        assert (message["content"] in matched) == (message["role"] == "assistant")  # the user's turns are context, matched nowhere


def test_a_template_that_is_not_prefix_stable_is_refused_naming_the_side(tokenizers):
    unstable = "{% for m in messages %}{{ m['content'] }}|{{ messages|length }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    pairing = Pairing(tokenizers["bytes"], tokenizers["bpe"])
    with pytest.raises(ConfigError, match="the teacher's chat template: rendering a conversation turn by turn does not give"):
        pairing.conversation(CONVERSATION, (STUDENT_TEMPLATE, unstable), 0)
    with pytest.raises(ConfigError, match="data.chat_template: rendering a conversation turn by turn does not give"):
        pairing.conversation(CONVERSATION, (unstable, TEACHER_TEMPLATE), 0)


def test_a_job_distills_conversations_across_tokenizers_each_with_its_own_template(tiny, corpus, tokenizers, tmp_path):
    from transformers import AutoTokenizer

    from conftest import read_metrics, run_job

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], teacher)
    own = AutoTokenizer.from_pretrained(teacher)
    own.chat_template = TEACHER_TEMPLATE  # the teacher's own; the student's is data.chat_template
    own.save_pretrained(teacher)
    lines = [line.strip() for line in open(corpus["train"]) if len(line.strip()) > 20][:200]
    path = tmp_path / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(0, len(lines) - 1, 2):
            f.write(json.dumps({"messages": [{"role": "user", "content": lines[i]}, {"role": "assistant", "content": lines[i + 1]}]}) + "\n")
    (tmp_path / "template.jinja").write_text(STUDENT_TEMPLATE)
    out, result = run_job(tiny, corpus, tmp_path / "run", f"teacher.path={teacher}", f"student.tokenizer={tokenizers['root'] / 'bytes'}",
                          f"data.train_files=[{path}]", f"data.validation_files=[{path}]", "data.messages_field=messages",
                          f"data.chat_template={tmp_path / 'template.jinja'}", "data.packing=false", "data.seq_len=128", "eval.speed=false",
                          "train.max_steps=4")
    assert all(m["train/kd_loss"] > 0 for m in read_metrics(out) if "train/loss" in m)
    assert 0.8 < result["pairing"]["aligned_targets"] / result["pairing"]["targets"] < 1  # the turns' text and ends; a cut group is not


def test_one_store_serves_students_of_two_other_tokenizers_and_a_pool_serves_them_as_it_does(tiny, corpus, tokenizers, tmp_path, capsys):
    """`distill cache-teacher` given a byte-level student's config writes the teacher's targets on its own rows (the bytes a
    config of the teacher's own tokenizer gives with --any-tokenizer), each with its own token's log-probability. A byte-level
    and a SentencePiece student both train from it; the signal it gives a batch is the in-process teacher's (every id is held:
    equal to float16); a pool gives a student the same losses as the store; a store without those log-probabilities is
    refused in one line."""
    from conftest import job_overrides, read_metrics, reset_accelerate
    from test_service import TOKEN, Pool

    from distill import data
    from distill.cache_teacher import build
    from distill.config import load_config
    from distill.job import run
    from distill.setup import Setup
    from distill.teacher_source import CacheSource, ModelSource
    from distill.term_names import LOGITS
    from distill_launcher.cli import main

    config, store, vocab = tmp_path / "job.yaml", tmp_path / "store", len(tiny["tokenizer"])
    config.write_text("{}\n")
    student = lambda name: f"student.tokenizer={tokenizers['root'] / name}"
    sets = [a for o in job_overrides(tiny, corpus, tmp_path / "r", student("bytes")) for a in ("--set", o)]
    assert main(["cache-teacher", str(config), "--out", str(store), "--top-k", str(vocab), *sets]) == 0
    assert "the teacher's targets are written on its own tokens" in capsys.readouterr().err
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["identity"]["targets"]["actual"] is True
    own = build(load_config(None, job_overrides(tiny, corpus, tmp_path / "r")), k=vocab, out=tmp_path / "own", any_tokenizer=True, log=lambda _: None)
    assert json.loads((own / "manifest.json").read_text())["splits"] == manifest["splits"]  # the same shards, to the byte

    terms = "loss.terms=[{kind: logits, name: kd, divergence: jsd, weight: 0.5}, {kind: ce, name: ce, weight: 0.5}]"
    runs = {}
    for name in ("bytes", "sentencepiece"):
        overrides = job_overrides(tiny, corpus, tmp_path / name, student(name), "teacher.source=cache", f"teacher.cache={store}",
                                  "eval.at_end=false", "train.max_steps=4", terms)
        cfg = load_config(None, overrides)
        setup = Setup(cfg, torch.device("cpu"), load_teacher=True)
        rows = [setup.train_sequences[i] for i in range(4)]
        assert all(len(r["teacher_input_ids"]) == 64 for r in rows)  # the teacher's rows, as stored; the student's of the same text
        batch = data.collate(rows, setup.tokenizer.pad_token_id, ids=[(0, i) for i in range(4)])
        stored = CacheSource(CacheSource.open(cfg, setup, quiet=True), setup.task, ["data"]).signal(batch, frozenset({LOGITS})).paired
        online = ModelSource(setup.teacher, setup.task, vocab).signal(batch, frozenset({LOGITS})).paired
        assert int(stored.known.sum()) == int((batch["teacher_labels"][:, 1:] != -100).sum()) > 200
        reference = torch.log_softmax(online.logits.float(), dim=-1)[stored.known]
        assert (stored.logits[stored.known] - reference).abs().max() < 1e-2
        reset_accelerate()
        capsys.readouterr()
        run(cfg)
        steps = [m for m in read_metrics(tmp_path / name) if "train/loss" in m]
        assert len(steps) == 4 and all(m["train/kd_loss"] > 0 for m in steps)
        said = capsys.readouterr().err
        assert f"({vocab} ids against the student's {len(tokenizers[name])}" in said and "teacher: store" in said
        runs[name] = [m["train/kd_loss"] for m in steps]

    server = Pool(tiny, corpus, tmp_path / "pool", "--top-k", str(vocab))
    try:
        url = server.ready()
        (tmp_path / "token").write_text(TOKEN)
        reset_accelerate()
        run(load_config(None, job_overrides(tiny, corpus, tmp_path / "remote", student("bytes"), "teacher.source=remote", f"teacher.url={url}",
                                            f"teacher.token_file={tmp_path / 'token'}", "eval.at_end=false", "train.max_steps=4", terms)))
    finally:
        server.stop()
    assert [m["train/kd_loss"] for m in read_metrics(tmp_path / "remote") if "train/loss" in m] == pytest.approx(runs["bytes"], rel=1e-4)

    plain = build(load_config(None, job_overrides(tiny, corpus, tmp_path / "r")), k=8, out=tmp_path / "plain", log=lambda _: None)
    with pytest.raises(ConfigError, match="needs the teacher's probability of each actual token; rebuild it with distill cache-teacher --any-tokenizer"):
        reset_accelerate()
        run(load_config(None, job_overrides(tiny, corpus, tmp_path / "refused", student("bytes"), "teacher.source=cache", f"teacher.cache={plain}")))
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()


def test_a_student_token_inside_a_teacher_token_is_compared_with_the_teachers_mass_on_going_on_so(tokenizers):
    from distill.aligned_terms import AlignedLogitsTerm
    from distill.losses import divergence
    from distill.objective import Outputs
    from distill.pairing import NO_INSIDE

    # The data: a byte of a word the teacher writes whole knows the teacher token and the two ranges of its vocabulary in text order.
    pairing = Pairing(tokenizers["bytes"], tokenizers["bpe"])
    doc = pairing.document([(TEXTS[1], True)], "k")
    texts = pairing.teacher_texts
    found = 0
    for i, (j, lo_p, hi_p, lo_x, hi_x) in enumerate(doc.inside):
        if j == NO_INSIDE[0]:
            continue
        found += 1
        assert doc.groups[i] == doc.teacher_groups[j] and doc.groups[i - 1] == doc.groups[i]  # inside its group, not its first token
        assert doc.teacher_ids[j] in pairing.teacher_order[lo_x:hi_x]  # the teacher's own token goes on as the text does
        within = b"".join(surface(tokenizers["bytes"].convert_ids_to_tokens(k), "byte_level")
                          for k, g in zip(doc.ids[:i + 1], doc.groups[:i + 1]) if g == doc.groups[i])
        before = within[:-1]
        assert all(t.startswith(within) for t in texts[lo_x:hi_x]) and all(t.startswith(before) and t != before for t in texts[lo_p:hi_p])
        assert lo_x == 0 or not texts[lo_x - 1].startswith(within)
        assert hi_x == len(texts) or not texts[hi_x].startswith(within)
    assert found >= len(doc.ids) // 8  # the tests' 320-id BPE writes few long tokens

    # The term: the student's probability of the token against the teacher's share of the mass that goes on so, as two outcomes.
    student_logits, paired, weights = _paired_batch()
    order = torch.randperm(13, generator=torch.Generator().manual_seed(3))
    paired.inside = torch.tensor(NO_INSIDE).repeat(2, 7, 1)
    paired.inside[0, 3] = torch.tensor([2, 1, 9, 3, 6])  # row 0's token 3 (second of group 1) is inside teacher token 2
    paired.inside[1, 2] = torch.tensor([1, 0, 13, 4, 5])  # row 1's token 2 (second of group 0) inside teacher token 1
    common = dict(divergence_kind="reverse_kl", temperature=2.0, jsd_beta=0.5, skew_alpha=0.1, shared=SHARED, student_width=11, teacher_width=13,
                  unshared=0.7, folds=FOLDS)
    with_inside = AlignedLogitsTerm("kd", 1.0, teacher_order=order.tolist(), **common)
    without = AlignedLogitsTerm("kd", 1.0, **common)
    difference = with_inside(Outputs(logits=student_logits), Outputs(paired=paired), weights) - without(Outputs(logits=student_logits), Outputs(paired=paired), weights)
    expected, fn = 0.0, divergence("reverse_kl", temperature=1.0)
    for b, i, (j, lo_p, hi_p, lo_x, hi_x) in ((0, 3, (2, 1, 9, 3, 6)), (1, 2, (1, 0, 13, 4, 5))):
        mass = torch.cat([torch.zeros(1, dtype=torch.float64), torch.softmax(paired.logits[b, j - 1] / 2.0, -1)[order].cumsum(0)])
        q = (mass[hi_x] - mass[lo_x]) / (mass[hi_p] - mass[lo_p])
        p = torch.softmax(student_logits[b, i - 1] / 2.0, -1)[paired.ids[b, i]]
        expected = expected + fn(torch.stack([p.log(), (1 - p).log()]), torch.stack([q.log(), (1 - q).log()]))
    torch.testing.assert_close(difference.double(), expected.double(), rtol=1e-4, atol=1e-6)


def test_the_students_own_completions_are_scored_by_a_teacher_of_another_tokenizer(tiny, corpus, tokenizers, tmp_path):
    """On-policy across tokenizers: each row the student completes is decoded and tokenized by both again, so the teacher's
    tokens spell the same text as the student's, the targets are the completion only, and a job trains on them."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import read_metrics, run_job
    from distill import data
    from distill.config import DataConfig, RolloutConfig
    from distill.rollout import Rollouts

    student_tokenizer, teacher_tokenizer = tokenizers["bytes"], tokenizers["bpe"]
    pairing = Pairing(student_tokenizer, teacher_tokenizer)
    texts = [p for p in open(corpus["train"]).read().split("\n\n") if len(p) > 80][:4]
    sequences = data.tokenize(Dataset.from_dict({"text": texts}), student_tokenizer, DataConfig(seq_len=48, packing=False), "training",
                              pairing=pairing, limit=256)
    batch = data.collate([sequences[i] for i in range(4)], student_tokenizer.pad_token_id, [(0, i) for i in range(4)])
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=len(student_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=256, bos_token_id=student_tokenizer.bos_token_id,
                                           eos_token_id=student_tokenizer.eos_token_id, pad_token_id=student_tokenizer.pad_token_id))
    rollouts = Rollouts(RolloutConfig(on_policy=1.0, max_new_tokens=16, prompt_tokens=8), tokenizer=student_tokenizer,
                        vocab=len(student_tokenizer), seed=0, pairing=pairing, teacher_limit=256)
    out = rollouts.apply(student, [batch], step=1, rank=0)[0]
    text = lambda tokenizer, ids: tokenizer.decode(ids, skip_special_tokens=True)
    for i in range(4):
        n, m = int(out["attention_mask"][i].sum()), int(out["teacher_attention_mask"][i].sum())
        ids, labels, groups = out["input_ids"][i, :n].tolist(), out["labels"][i, :n].tolist(), out["groups"][i, :n].tolist()
        assert text(student_tokenizer, ids) == text(teacher_tokenizer, out["teacher_input_ids"][i, :m].tolist())  # the same text on both sides
        assert text(student_tokenizer, ids).startswith(text(student_tokenizer, batch["input_ids"][i, :8].tolist()))  # after the row's prompt
        targets = [j for j, label in enumerate(labels) if label != -100]
        assert targets and targets[0] >= 8 and all(label == ids[j] for j, label in enumerate(labels) if label != -100)  # the completion only
        assert sum(1 for g in groups if g != NO_GROUP) >= len(targets) // 2
    assert rollouts.metrics(1.0)["train/on_policy_rows"] == 1.0
    out, _ = run_job(tiny, corpus, tmp_path / "run", f"student.tokenizer={tokenizers['root'] / 'bytes'}", "data.packing=false",
                     "rollout.on_policy=1", "rollout.max_new_tokens=16", "rollout.prompt_tokens=8", "train.max_steps=3", "eval.at_end=false",
                     "loss.terms=[{kind: logits, name: kd, divergence: jsd, weight: 1.0}]")
    steps = [m for m in read_metrics(out) if "train/loss" in m]
    assert len(steps) == 3 and all(m["train/kd_loss"] > 0 and m["train/on_policy_rows"] == 1 for m in steps)

"""data.augment: rewritten copies of the training rows, without a label, seeded by (seed, source, row, copy);
TinyBERT's masked-LM word replacement and span deletion, on real models saved and loaded back."""

import re

import pytest

from conftest import classifier_job, few_labels, reset_accelerate
from distill.augment import SpanDelete, WordReplace, parse_augment
from distill.config import ConfigError, load_config

TEXTS = ["Return the list of words in the string, using sep as the delimiter string.",
         "Split the pathname into a pair of head and tail, where tail is everything after the final slash.",
         "one"]


def _words(text):
    return text.split()


def test_span_deletion_drops_about_rate_of_the_words_the_same_way_every_time():
    spec = parse_augment({"kind": "span_delete", "copies": 3, "rate": 0.3}, "data.augment")
    copies = SpanDelete(spec, "text").rewrite(TEXTS)
    assert copies == SpanDelete(spec, "text").rewrite(TEXTS)  # seeded by (seed, source, row, copy) alone
    assert copies[1] == SpanDelete(spec, "text").rewrite(TEXTS[1:2] * 2)[1]  # row 1 is rewritten the same beside other rows
    assert copies != SpanDelete(parse_augment({"kind": "span_delete", "copies": 3, "seed": 1}, "k"), "text").rewrite(TEXTS)
    assert copies != SpanDelete(spec, "other").rewrite(TEXTS)  # another source draws other spans
    for text, versions in zip(TEXTS[:2], copies[:2]):
        assert len(set(versions)) == 3
        for version in versions:  # an ordered subsequence of the words, about 30% fewer
            kept = _words(version)
            assert len(kept) == len(_words(text)) - round(0.3 * len(_words(text)))
            it = iter(_words(text))
            assert all(w in it for w in kept)
    assert copies[2] == ["one"] * 3  # a single word is kept


def test_word_replacement_takes_a_masked_lms_best_predictions(bert):
    """TinyBERT's rule: about rate of the one-piece words, each replaced by one of the masked LM's K best whole words."""
    from distill import models

    spec = parse_augment({"kind": "word_replace", "copies": 4, "rate": 0.4, "model": bert["teacher"], "candidates": 5}, "data.augment")
    model, tokenizer = models.load_masked_lm(bert["teacher"], "data.augment.model", "cpu"), models.load_tokenizer(bert["teacher"], "k")
    augment = WordReplace(spec, "text", model=model, tokenizer=tokenizer)
    copies = augment.rewrite(TEXTS)
    assert copies == WordReplace(spec, "text", model=model, tokenizer=tokenizer).rewrite(TEXTS)
    alpha = re.compile(r"[A-Za-z]+")
    vocab = set(tokenizer.get_vocab())
    changed = 0
    for text, versions in zip(TEXTS, copies):
        before = alpha.findall(text)
        for version in versions:
            after = alpha.findall(version)
            assert len(after) == len(before) and alpha.sub("", version) == alpha.sub("", text)  # only words change, never the rest
            for old, new in zip(before, after):
                if old != new:
                    changed += 1
                    assert new.lower() in vocab and not new.startswith("##")
    one_piece = sum(len(tokenizer.tokenize(w)) == 1 for t in TEXTS for w in alpha.findall(t))
    assert 0.2 * 4 * one_piece < changed < 0.6 * 4 * one_piece
    # The candidates of a word are the masked LM's own best whole words in its place (the model run as a user would).
    import torch

    words = [list(alpha.finditer(TEXTS[1]))]
    j = next(j for j, m in enumerate(words[0]) if m.group() == "head")
    masked = TEXTS[1][: words[0][j].start()] + tokenizer.mask_token + TEXTS[1][words[0][j].end() :]
    encoded = tokenizer(masked, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits[0, encoded["input_ids"][0].tolist().index(tokenizer.mask_token_id)]
    ranked = [tokenizer.convert_ids_to_tokens(i) for i in logits.argsort(descending=True).tolist()]
    expected = [t for t in ranked if t.isalpha() and t not in tokenizer.all_special_tokens and t != "head"][:5]
    assert augment._candidates([TEXTS[1]], words, [(0, j)])[(0, j)] == expected


def test_rewritten_rows_are_kept_and_read_back_for_the_same_model_spec_source_and_texts_only(bert, tmp_path, monkeypatch):
    """word_replace costs a masked-LM forward per replaced word: a source is rewritten once and read back after."""
    import json

    import torch

    from distill import models
    from distill.augment.source import rewrite_cached

    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path))
    spec = parse_augment({"kind": "word_replace", "copies": 2, "rate": 0.4, "model": bert["teacher"]}, "data.augment")
    model, tokenizer = models.load_masked_lm(bert["teacher"], "data.augment.model", "cpu"), models.load_tokenizer(bert["teacher"], "k")
    copies, read = rewrite_cached(WordReplace(spec, "text", model=model, tokenizer=tokenizer), TEXTS)
    assert read is None and copies == WordReplace(spec, "text", model=model, tokenizer=tokenizer).rewrite(TEXTS)
    [path] = (tmp_path / "augment").iterdir()
    assert rewrite_cached(WordReplace(spec, "text", model=models.load_masked_lm(bert["teacher"], "k", "cpu"), tokenizer=tokenizer), TEXTS) == (copies, path)
    path.write_text(json.dumps([["kept"] * 2] * 3))  # what comes back is the file's
    assert rewrite_cached(WordReplace(spec, "text", model=model, tokenizer=tokenizer), TEXTS)[0][0] == ["kept", "kept"]
    other = parse_augment({"kind": "word_replace", "copies": 2, "rate": 0.4, "model": bert["teacher"], "seed": 1}, "data.augment")
    for augment, texts in [(WordReplace(spec, "text", model=model, tokenizer=tokenizer), TEXTS[:2]),
                           (WordReplace(spec, "other", model=model, tokenizer=tokenizer), TEXTS),
                           (WordReplace(other, "text", model=model, tokenizer=tokenizer), TEXTS)]:
        assert rewrite_cached(augment, texts)[1] is None
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)  # other weights (a student as another seed starts): rewritten, not read
    assert rewrite_cached(WordReplace(spec, "text", model=model, tokenizer=tokenizer), TEXTS)[1] is None
    path.write_text("[[")  # a torn file is rewritten
    assert rewrite_cached(WordReplace(spec, "text", model=models.load_masked_lm(bert["teacher"], "k", "cpu"), tokenizer=tokenizer), TEXTS) == (copies, None)
    assert len(list((tmp_path / "augment").iterdir())) == 5  # the first, three others, other weights
    span = parse_augment({"kind": "span_delete"}, "data.augment")  # cheap to redo: not kept
    assert rewrite_cached(SpanDelete(span, "text"), TEXTS) == (SpanDelete(span, "text").rewrite(TEXTS), None)
    assert len(list((tmp_path / "augment").iterdir())) == 5


def test_augmented_copies_train_the_teachers_terms_as_unlabelled_rows(labelled, bert, tmp_path, capsys):
    from distill.job import run

    augment = f"{{kind: word_replace, copies: 2, rate: 0.3, model: {bert['teacher']}}}"
    result = run(load_config(None, classifier_job(labelled, tmp_path / "run", *few_labels(labelled, tmp_path, augment), "loss.alpha=0.5",
                                                  "train.max_steps=10", "eval.speed=false", "eval.initial=false")))
    err = capsys.readouterr().err
    assert "data: the training (text) data has 480 rows and 960 augmented copies (word_replace, 30% of the words from the 15 best of " in err
    assert "data: 119 labelled and 1,441 unlabelled training rows" in err
    assert result["train_rows_unlabelled"] > result["train_rows_labelled"] > 0


@pytest.mark.parametrize("augment, message", [
    ("{kind: word_replace}", "data.mixture[1].augment.model=teacher: word_replace needs a masked LM's predictions, and "
                             "task.kind=sequence_classification's teacher is not a masked LM"),
    ("{kind: shuffle}", "data.mixture[1].augment.kind: must be one of word_replace, span_delete (got 'shuffle')"),
    ("{kind: span_delete, copies: 0}", "data.mixture[1].augment.copies must be an integer >= 1 (got 0)"),
    ("{kind: span_delete, rate: 1.5}", "data.mixture[1].augment.rate must be in (0, 1] (got 1.5)"),
    ("{kind: span_delete, model: x}", "unknown config key: data.mixture[1].augment.model (a span_delete augmentation takes copies, kind, max_span, originals, rate, seed)"),
])
def test_augmentation_a_task_cannot_use_fails_when_the_config_loads(labelled, tmp_path, augment, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, classifier_job(labelled, tmp_path / "run", *few_labels(labelled, tmp_path, augment)))


def _masked_lm_job(bert, corpus, out, *extra):
    return ["task.kind=masked_lm", f"teacher.path={bert['teacher']}", "teacher.dtype=float32",
            "student.architecture={num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64, num_attention_heads: 2}",
            f"data.train_files=[{corpus['jsonl']}]", f"data.validation_files=[{corpus['validation']}]", "data.seq_len=48",
            "train.max_steps=2", "train.micro_batch_size=8", "eval.at_end=false", "tracking.backend=none", f"output_dir={out}", *extra]


def test_a_masked_lm_replaces_words_from_its_own_teacher(bert, corpus, tmp_path, capsys):
    """task.kind=masked_lm: the teacher's own predictions (model: teacher), no other model needed."""
    from distill.job import run

    reset_accelerate()
    run(load_config(None, _masked_lm_job(bert, corpus, tmp_path / "run", "data.augment={kind: word_replace, copies: 1, rate: 0.2}")))
    assert re.search(r"data: the training data has ([\d,]+) rows and \1 augmented copies \(word_replace, 20% of the words from the 15 best "
                     r"of teacher's masked-LM predictions\)", capsys.readouterr().err)


def test_the_students_predictions_are_the_same_where_the_student_is_not_built(bert, corpus, tmp_path):
    """model: student: a store's build (no student of its own) rewrites the rows as the job does, from the same initial student."""
    import torch

    from distill.setup import Setup

    cfg = load_config(None, _masked_lm_job(bert, corpus, tmp_path / "run", "data.augment={kind: word_replace, copies: 1, rate: 0.3, model: student}"))
    job = Setup(cfg, torch.device("cpu"), load_teacher=False)
    store = Setup(cfg, torch.device("cpu"), load_student=False)
    assert job.train_sequences["input_ids"] == store.train_sequences["input_ids"]
    plain = Setup(load_config(None, _masked_lm_job(bert, corpus, tmp_path / "run")), torch.device("cpu"), load_teacher=False, load_student=False)
    assert len(job.train_sequences) > len(plain.train_sequences)


@pytest.mark.parametrize("originals", [True, False])
def test_an_augmented_source_keeps_its_rows_or_is_copies_alone_and_the_copies_have_no_label(originals, capsys):
    from datasets import Dataset

    from distill.augment.source import augmented
    from distill.config import DataConfig

    rows = [{"text": t, "label": "a"} for t in TEXTS[:2]]
    spec = parse_augment({"kind": "span_delete", "copies": 2, "originals": originals}, "data.augment")
    out = augmented(Dataset.from_list(rows), DataConfig(), SpanDelete(spec, "text"), split_name="training (text)").to_list()
    copies = out[2:] if originals else out
    assert out[:2] == rows if originals else len(out) == 4
    assert [c["label"] for c in copies] == [None] * 4 and [c["text"] for c in copies] == [v for vs in SpanDelete(spec, "text").rewrite(TEXTS[:2]) for v in vs]
    said = "has 2 rows and 4 augmented copies" if originals else "is 4 augmented copies of its 2 rows"
    assert f"data: the training (text) data {said} (span_delete, 30% of the words in spans of up to 3); the copies have no label" in capsys.readouterr().err

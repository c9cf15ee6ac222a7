"""A teacher and a student with different tokenizers: both tokenize each text, their tokens are matched by the
characters they cover, and their vocabularies are mapped where they hold the same string.

A *group* is the shortest run of student tokens and run of teacher tokens that end at the same character:
one token each where the tokenizers agree, several on one side where one splits what the other keeps whole
(a number, a rare word, a multi-byte character). Targets are compared group by group
(:mod:`distill.aligned_terms`); a token in no group (a BOS or EOS one side lacks, text one side cut) is no
divergence target, and the job counts them. Torch-free: the data's tokenization runs it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from distill.errors import ConfigError

NO_GROUP = -1
NO_INSIDE = (-1, 0, 0, 0, 0)


def char_ends(tokenizer, text: str, key: str) -> tuple[list[int], list[int]]:
    """(token ids of ``text`` without special tokens, the character each token ends at): :func:`char_spans` without the starts."""
    ids, _, ends = char_spans(tokenizer, text, key)
    return ids, ends


def char_spans(tokenizer, text: str, key: str) -> tuple[list[int], list[int], list[int]]:
    """(token ids of ``text`` without special tokens, the character each token starts at, the one it ends at).

    A fast tokenizer gives offsets; a slow one (SentencePiece's own) is decoded prefix by prefix, each
    prefix followed by a one-character token so that a decoder trimming trailing spaces keeps them,
    which holds where its decoding gives the text back. The ends never go backwards (a token of a
    multi-byte character's bytes ends where the character ends).
    """
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, ends = encoded["input_ids"], [end for _, end in encoded["offset_mapping"]]
        starts = [start for start, _ in encoded["offset_mapping"]]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        decode = lambda tokens: tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        mark, ends = _one_character(tokenizer), []
        for i in range(len(ids) if mark is not None and decode(ids) == text else 0):
            prefix = decode(ids[: i + 1] + [mark[0]])
            if not (prefix.endswith(mark[1]) and text.startswith(prefix[: -len(mark[1])])):
                break
            ends.append(len(prefix) - len(mark[1]))
        if len(ends) != len(ids):
            raise ConfigError(f"{key}: the tokenizer ({type(tokenizer).__name__}) gives no character offsets and its decoding does not "
                              "give the text back, so its tokens cannot be matched with the other tokenizer's; use its fast version "
                              "(a tokenizer.json)")
        starts = [0, *ends[:-1]]
    out, reached = [], 0
    for end in ends:
        reached = max(reached, end)
        out.append(reached)
    return ids, starts, out


def _one_character(tokenizer) -> tuple[int, str] | None:
    """A token that decodes to one letter or digit alone (the mark after a decoded prefix), or None."""
    for candidate in "xX0a":
        ids = tokenizer.convert_tokens_to_ids([candidate])
        if ids and ids[0] is not None and ids[0] != tokenizer.unk_token_id and tokenizer.decode(ids) == candidate:
            return ids[0], candidate
    return None


def groups(student_ends: list[int], teacher_ends: list[int]) -> list[tuple[int, int, int, int]]:
    """The groups of two tokenizations of one text, as (student start, stop, teacher start, stop) token ranges.

    Both sides advance the token that ends first; a group closes where both end at the same character, and
    takes with it the tokens that end there too (the later bytes of a character, a zero-width token).
    Tokens after the last shared end (one side's text longer) are in no group.
    """
    out, s0, t0, s, t = [], 0, 0, 0, 0
    while s < len(student_ends) and t < len(teacher_ends):
        if student_ends[s] < teacher_ends[t]:
            s += 1
        elif teacher_ends[t] < student_ends[s]:
            t += 1
        else:
            end = student_ends[s]
            while s + 1 < len(student_ends) and student_ends[s + 1] == end:
                s += 1
            while t + 1 < len(teacher_ends) and teacher_ends[t + 1] == end:
                t += 1
            s, t = s + 1, t + 1
            out.append((s0, s, t0, t))
            s0, t0 = s, t
    return out


@dataclass
class Document:
    """One document tokenized by both: ids, labels (the student's), and each token's group (``NO_GROUP``: none).

    ``inside``: for a student token within one teacher token but not starting its group (a byte of a word the teacher
    writes whole), (that teacher token's index, then the ranges of the teacher's vocabulary sorted by text that start
    with the text before the student token and with it: ``lo_p, hi_p, lo_x, hi_x``); else ``NO_INSIDE``."""

    ids: list[int]
    labels: list[int]
    teacher_ids: list[int]
    groups: list[int]
    teacher_groups: list[int]
    inside: list[tuple]
    teacher_labels: list[int]  # the teacher's targets, as a job of the teacher's tokenizer labels them (a store's or a pool's rows)

    def __len__(self) -> int:
        return len(self.ids)


class Pairing:
    """Two tokenizers that differ: how a text is tokenized by both and matched, and which ids hold the same string."""

    def __init__(self, student_tokenizer, teacher_tokenizer):
        self.student, self.teacher = student_tokenizer, teacher_tokenizer
        mine, theirs = token_texts(student_tokenizer), token_texts(teacher_tokenizer)  # each vocabulary read once
        self.shared = shared_vocabulary(student_tokenizer, teacher_tokenizer, mine, theirs)
        self.folds = (prefix_folds(mine, self.shared[0]), prefix_folds(theirs, self.shared[1]))
        self.student_bytes, self.teacher_bytes = ({i: len(text) for i, text in texts.items()} for texts in (mine, theirs))
        self.teacher_order, self.teacher_texts = sorted_by_text(theirs)

    def target_bytes(self, row: dict) -> dict:
        """The UTF-8 bytes of text each side's targets in ``row`` cover: the student's targets, the teacher's tokens in a group
        (what evaluation's bits per byte divide by, comparable across tokenizers)."""
        size = lambda table, i: table.get(i, 0)
        return {"target_bytes": sum(size(self.student_bytes, i) for i, label in zip(row["input_ids"][1:], row["labels"][1:]) if label != -100),
                "teacher_target_bytes": sum(size(self.teacher_bytes, i) for i, g in zip(row["teacher_input_ids"][1:], row["teacher_groups"][1:])
                                            if g != NO_GROUP)}

    student_width = teacher_width = None  # each side's ids, set once the models are known
    counts = None  # of the training data (summary)

    def conversation(self, messages: list[dict], templates: tuple[str, str], row: int) -> Document:
        """Both renderings of a conversation, each with its own model's template: the student's targets are its assistant turns;
        each assistant message's text is matched between the two renderings (a group of tokens cut by the text's edges is
        in no group), and the tokens that close each turn (an end-of-turn marker, whatever each template writes) are one
        group: the two models' probability of ending the turn there."""
        sides = []
        for tokenizer, template, key in ((self.student, templates[0], "data.chat_template"), (self.teacher, templates[1], "the teacher's chat template")):
            text, turns = assistant_turns(tokenizer, messages, template, row, key)
            ids, starts, ends = char_spans(tokenizer, text, key)
            contents = []
            for message in (m for m in messages if m["role"] == "assistant"):
                start = text.find(message["content"], turns[len(contents)][0])
                contents.append((start, start + len(message["content"])) if message["content"] and start >= 0 else None)
            sides.append((text, turns, ids, starts, ends, contents))
        (_, s_turns, s_ids, s_starts, s_ends, s_contents), (_, t_turns, t_ids, t_starts, t_ends, t_contents) = sides
        labels = assistant_labels(s_ids, s_starts, s_ends, s_turns)
        t_labels = assistant_labels(t_ids, t_starts, t_ends, t_turns)
        s_groups, t_groups, count = [NO_GROUP] * len(s_ids), [NO_GROUP] * len(t_ids), 0
        inside = lambda starts, ends, a, b: [j for j in range(len(starts)) if a <= starts[j] and ends[j] <= b and ends[j] > starts[j]]
        for s_turn, t_turn, s_content, t_content in zip(s_turns, t_turns, s_contents, t_contents):
            if s_content is not None and t_content is not None:
                mine, theirs = inside(s_starts, s_ends, *s_content), inside(t_starts, t_ends, *t_content)
                found = groups([s_ends[j] - s_content[0] for j in mine], [t_ends[j] - t_content[0] for j in theirs])
                if found and mine and theirs and s_starts[mine[0]] - s_content[0] != t_starts[theirs[0]] - t_content[0]:
                    found = found[1:]  # the two first tokens start at different characters: their group would not be one text
                for s0, s1, t0, t1 in found:
                    for j in mine[s0:s1]:
                        s_groups[j] = count
                    for j in theirs[t0:t1]:
                        t_groups[j] = count
                    count += 1
            s_close = inside(s_starts, s_ends, s_content[1] if s_content else s_turn[1], s_turn[1])
            t_close = inside(t_starts, t_ends, t_content[1] if t_content else t_turn[1], t_turn[1])
            if s_content is not None and t_content is not None and s_close and t_close:
                for j in s_close:
                    s_groups[j] = count
                for j in t_close:
                    t_groups[j] = count
                count += 1
        return Document(s_ids, labels, t_ids, s_groups, t_groups, [NO_INSIDE] * len(s_ids), t_labels)  # a conversation's groups are its turns' text

    def count(self, sequences) -> dict:
        """What the report says of a run's pairing: the vocabularies, how many tokens they share, and how many of the
        student's training targets are in a group (compared with the teacher) or in none (the divergence skips them)."""
        targets = grouped = 0
        for labels, group_ids in zip(sequences["labels"], sequences["groups"]):
            for label, group in zip(labels[1:], group_ids[1:]):
                if label != -100:
                    targets += 1
                    grouped += group != NO_GROUP
        return {"student_vocabulary": len(self.student), "teacher_vocabulary": len(self.teacher), "shared_tokens": len(self.shared[0]),
                "targets": targets, "aligned_targets": grouped}

    def summary(self, sequences) -> str:
        """The line the job prints; ``counts`` keeps the figures for the report."""
        c = self.counts = self.count(sequences)
        return (f"the teacher tokenizes differently ({c['teacher_vocabulary']:,} ids against the student's {c['student_vocabulary']:,}, "
                f"{c['shared_tokens']:,} tokens in both); {c['aligned_targets']:,} of {c['targets']:,} training targets "
                f"({c['aligned_targets'] / max(c['targets'], 1):.1%}) are matched to the teacher's tokens, the rest skip the teacher's terms")

    def document(self, pieces: list[tuple[str, bool]], key: str, *, eos: bool = True) -> Document:
        """Both tokenizations of a document given as (text, is a target) pieces, each tokenized on its own (a prompt,
        then its completion), between each tokenizer's own BOS and EOS (none with ``eos`` false: a completion cut short).
        The EOS of both is one group."""
        s_ids, s_labels, t_ids, t_labels, s_groups, t_groups = [], [], [], [], [], []
        if self.student.bos_token_id is not None:
            s_ids.append(self.student.bos_token_id), s_labels.append(-100), s_groups.append(NO_GROUP)
        if self.teacher.bos_token_id is not None:
            t_ids.append(self.teacher.bos_token_id), t_labels.append(-100), t_groups.append(NO_GROUP)
        count, inside = 0, [NO_INSIDE] * len(s_ids)
        for text, target in pieces:
            if not text:
                continue
            a, a_ends = char_ends(self.student, text, "student tokenizer")
            b, b_ends = char_ends(self.teacher, text, "teacher tokenizer")
            mine, theirs = [NO_GROUP] * len(a), [NO_GROUP] * len(b)
            for s0, s1, t0, t1 in groups(a_ends, b_ends):
                mine[s0:s1], theirs[t0:t1] = [count] * (s1 - s0), [count] * (t1 - t0)
                count += 1
            inside += [(j + len(t_ids), *ranges) if j >= 0 else NO_INSIDE for j, *ranges in self._inside(text, a, a_ends, mine, b, b_ends)]
            s_ids += a
            s_labels += a if target else [-100] * len(a)
            s_groups += mine
            t_ids += b
            t_labels += b if target else [-100] * len(b)
            t_groups += theirs
        s_eos, t_eos = (self.student.eos_token_id, self.teacher.eos_token_id) if eos else (None, None)
        if s_eos is not None:
            s_ids.append(s_eos), s_labels.append(s_eos), s_groups.append(count if t_eos is not None else NO_GROUP)
            inside.append(NO_INSIDE)
        if t_eos is not None:
            t_ids.append(t_eos), t_labels.append(t_eos), t_groups.append(count if s_eos is not None else NO_GROUP)
        return Document(s_ids, s_labels, t_ids, s_groups, t_groups, inside, t_labels)

    def _inside(self, text: str, ids: list[int], ends: list[int], group_ids: list[int], teacher_ids: list[int], teacher_ends: list[int]) -> list[tuple]:
        """:class:`Document`'s ``inside`` of one piece's student tokens (teacher indices within the piece)."""
        out, j = [], 0
        for i, (end, group) in enumerate(zip(ends, group_ids)):
            start = ends[i - 1] if i else 0
            while j < len(teacher_ends) and teacher_ends[j] < end:
                j += 1
            t_start = teacher_ends[j - 1] if j else 0
            first_of_group = i == 0 or group_ids[i - 1] != group
            if (group == NO_GROUP or first_of_group or j == len(teacher_ends) or not (t_start <= start < end <= teacher_ends[j])
                    or self.teacher_bytes.get(teacher_ids[j]) != len(text[t_start:teacher_ends[j]].encode())
                    or self.student_bytes.get(ids[i]) != len(text[start:end].encode())):
                out.append(NO_INSIDE)  # not within one teacher token whose text is its own (a dummy prefix), or a piece of a character
                continue
            before, through = text[t_start:start].encode(), text[t_start:end].encode()
            lo_p, hi_p = prefix_range(self.teacher_texts, before)
            if lo_p < hi_p and self.teacher_texts[lo_p] == before:
                lo_p += 1  # the teacher's token that is exactly the text before: what follows it is another token's, not known here
            out.append((j, lo_p, hi_p, *prefix_range(self.teacher_texts, through)))
        return out



def assistant_turns(tokenizer, messages: list[dict], template: str, row: int, key: str = "data.chat_template") -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered whole, and each assistant turn's characters in it: what rendering through the turn adds
    to rendering before it with the generation prompt (its closing tokens included)."""
    render = lambda upto, prompt: tokenizer.apply_chat_template(messages[:upto], chat_template=template, tokenize=False,
                                                                add_generation_prompt=prompt)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ConfigError(f"data.messages_field: row {row} is not a list of {{role, content}} messages")
    text, spans = render(len(messages), False), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(i, True), render(i + 1, False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ConfigError(f"{key}: rendering a conversation turn by turn does not give the whole conversation's prefix; "
                              "targets cannot be placed on the assistant turns with this template")
        spans.append((len(before), len(through)))
    return text, spans


def assistant_labels(ids: list[int], starts: list[int], ends: list[int], turns: list[tuple[int, int]]) -> list[int]:
    """Each token's id where it lies within an assistant turn's characters (:func:`assistant_turns`), else -100."""
    return [i if any(a <= start and end <= b and end > start for a, b in turns) else -100 for i, start, end in zip(ids, starts, ends)]


def blocks(doc: Document, spans: list[tuple[int, int]], limit: int, *, by_teacher: bool = False) -> list[dict]:
    """The student tokens ``[start, stop)`` of ``doc`` (a document, or several packed) for each span, as rows with the teacher
    tokens of the same text: from the first group the block touches (a group cut by the block's start is the other side's
    context, in no group) to the last it holds whole, at most ``limit``. Only groups whole on both sides keep their number;
    the others' tokens are in no group. ``by_teacher``: the spans are the teacher's tokens (the rows of a store or a pool,
    cut as a job of the teacher's tokenizer cuts them) and the student's tokens of the same text follow, at most ``limit``."""
    lead, other = (doc.teacher_groups, doc.groups) if by_teacher else (doc.groups, doc.teacher_groups)
    first_other, other_length = _starts(lead, other), len(other)
    s_span, t_span = _spans(doc.groups), _spans(doc.teacher_groups)
    rows = []
    for start, stop in spans:
        o0 = first_other[start]
        o1 = min(first_other[stop] if stop < len(lead) else other_length, o0 + limit)
        (s0, s1), (t0, t1) = ((o0, o1), (start, stop)) if by_teacher else ((start, stop), (o0, o1))
        whole = lambda g: s0 <= s_span[g][0] and s_span[g][1] <= s1 and t0 <= t_span[g][0] and t_span[g][1] <= t1
        kept = {g: n for n, g in enumerate(sorted({g for g in doc.groups[s0:s1] if g != NO_GROUP and g in t_span and whole(g)}))}
        mark = lambda gs: [kept.get(g, NO_GROUP) for g in gs]  # numbered from 0 in each row
        inside = [(j - t0, *ranges) if t0 < j < t1 else NO_INSIDE for j, *ranges in doc.inside[s0:s1]]
        rows.append({"input_ids": doc.ids[s0:s1], "labels": doc.labels[s0:s1], "teacher_input_ids": doc.teacher_ids[t0:t1],
                     "teacher_labels": doc.teacher_labels[t0:t1], "groups": mark(doc.groups[s0:s1]),
                     "teacher_groups": mark(doc.teacher_groups[t0:t1]), "inside": inside})
    return rows


def _spans(group_ids: list[int]) -> dict[int, tuple[int, int]]:
    """Each group's [first, last + 1) token positions."""
    out = {}
    for i, g in enumerate(group_ids):
        if g != NO_GROUP:
            out[g] = (out[g][0], i + 1) if g in out else (i, i + 1)
    return out


def _starts(lead: list[int], other: list[int]) -> list[int]:
    """For each token of one side (its groups ``lead``), the first token of its group on the other side (``other``); for a
    token in none, the other side's token after the last group before it (a BOS of the other side's where this one has one)."""
    spans = _spans(other)
    out, after = [], 0
    for g in lead:
        if g != NO_GROUP and g in spans:
            out.append(spans[g][0])
            after = spans[g][1]
        else:
            out.append(after)
    return out


def concatenate(docs: list[Document]) -> Document:
    """Documents one after another (packing), their groups renumbered to stay distinct."""
    out, offset = Document([], [], [], [], [], [], []), 0
    for doc in docs:
        top = max([g for g in doc.groups + doc.teacher_groups if g != NO_GROUP], default=-1)
        shift = lambda gs: [g + offset if g != NO_GROUP else NO_GROUP for g in gs]
        out.inside += [(j + len(out.teacher_ids), *ranges) if j >= 0 else NO_INSIDE for j, *ranges in doc.inside]
        out.ids += doc.ids
        out.labels += doc.labels
        out.teacher_ids += doc.teacher_ids
        out.teacher_labels += doc.teacher_labels
        out.groups += shift(doc.groups)
        out.teacher_groups += shift(doc.teacher_groups)
        offset += top + 1
    return out


# ----------------------------------------------------------------------------- the shared vocabulary

_BYTE_LEVEL = None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (the printable characters byte-level BPE writes each byte as)."""
    global _BYTE_LEVEL
    if _BYTE_LEVEL is None:
        printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        chars, n = list(printable), 0
        for b in range(256):
            if b not in printable:
                printable.append(b)
                chars.append(256 + n)
                n += 1
        _BYTE_LEVEL = {chr(c): b for b, c in zip(printable, chars)}
    return _BYTE_LEVEL


def _style(tokenizer) -> str:
    """How the tokenizer writes a token's text: byte_level (GPT-2, Llama 3, Qwen), metaspace (SentencePiece), wordpiece or plain."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = f"{getattr(backend, 'pre_tokenizer', None)} {getattr(backend, 'decoder', None)}" if backend is not None else type(tokenizer).__name__
    if "ByteLevel" in described:
        return "byte_level"
    if "Metaspace" in described or "SentencePiece" in type(tokenizer).__name__ or "Llama" in type(tokenizer).__name__ and backend is None:
        return "metaspace"
    if "WordPiece" in described or "Bert" in type(tokenizer).__name__:
        return "wordpiece"
    return "plain"


def surface(token: str, style: str) -> bytes | None:
    """The bytes a token adds to the text, the tokenizers' space markers undone; None where that is not one string."""
    if style == "byte_level":
        table = _byte_decoder()
        return bytes(table[c] for c in token) if all(c in table for c in token) else None
    if style == "metaspace":
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])
        return token.replace("▁", " ").encode()
    if style == "wordpiece":
        return token[2:].encode() if token.startswith("##") else token.encode()
    return token.encode()


def token_texts(tokenizer) -> dict[int, bytes]:
    """Each ordinary token's text (:func:`surface`; special tokens and tokens without one string left out)."""
    style, specials = _style(tokenizer), set(tokenizer.all_special_ids)
    return {i: text for token, i in tokenizer.get_vocab().items() if i not in specials and (text := surface(token, style)) is not None}


def sorted_by_text(texts: dict[int, bytes]) -> tuple[list[int], list[bytes]]:
    """The tokens in the order of their texts' bytes (those starting with a text are then one range), and the texts."""
    pairs = sorted((text, i) for i, text in texts.items())
    return [i for _, i in pairs], [text for text, _ in pairs]


def prefix_range(texts: list[bytes], prefix: bytes) -> tuple[int, int]:
    """[lo, hi) of the sorted ``texts`` that start with ``prefix``."""
    lo = bisect.bisect_left(texts, prefix)
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return lo, len(texts)
    return lo, bisect.bisect_left(texts, stripped[:-1] + bytes([stripped[-1] + 1]))


def _first_ids(texts: dict[int, bytes]) -> dict[bytes, int]:
    """Each text's lowest id."""
    out = {}
    for i in sorted(texts):
        out.setdefault(texts[i], i)
    return out


def shared_vocabulary(student_tokenizer, teacher_tokenizer, student_texts: dict[int, bytes], teacher_texts: dict[int, bytes]
                      ) -> tuple[list[int], list[int]]:
    """(student ids, teacher ids) of the tokens both vocabularies hold (the same bytes once space markers are undone), and
    BOS with BOS, EOS with EOS; in the student's id order. ``*_texts``: :func:`token_texts`."""
    mine, theirs = _first_ids(student_texts), _first_ids(teacher_texts)
    pairs = {mine[text]: theirs[text] for text in mine.keys() & theirs.keys()}
    for name in ("bos_token_id", "eos_token_id"):
        a, b = getattr(student_tokenizer, name), getattr(teacher_tokenizer, name)
        if a is not None and b is not None:
            pairs[a] = b
    student_ids = sorted(pairs)
    return student_ids, [pairs[i] for i in student_ids]


def prefix_folds(texts: dict[int, bytes], shared_ids: list[int]) -> dict[int, int]:
    """For each token the other vocabulary lacks, the place among ``shared_ids`` of the longest shared token its text starts
    with (its mass is the next text starting with that token's: what the other side's entry for it holds); none: left out.
    ``texts``: this side's :func:`token_texts`."""
    place = {}
    for k, i in enumerate(shared_ids):
        if texts.get(i):
            place.setdefault(texts[i], k)
    shared, out = set(shared_ids), {}
    for i, text in texts.items():
        if i in shared:
            continue
        for end in range(len(text) - 1, 0, -1):
            if text[:end] in place:
                out[i] = place[text[:end]]
                break
    return out

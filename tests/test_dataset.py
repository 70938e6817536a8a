"""Import, cleaning, dedupe, frozen splits and export, on a real SQLite store."""

import json

import pytest
from sqlmodel import func, select

from data_store.db import session
from data_store.models import Example, SplitKey
from retrain import dataset, examples, export, importer, parse
from retrain.importer import ImportFailed


def write(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    return path


def n_examples(engine):
    with session(engine) as s:
        return s.exec(select(func.count()).select_from(Example)).one()


GOOD = [
    json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                             {"role": "assistant", "content": "4"}]}),
    json.dumps({"prompt": "Name a primary colour.", "completion": "Red."}),
    json.dumps({"input": "Translate 'cat' to French.", "output": "chat"}),
]


def test_imports_every_shape(engine, settings, tmp_path):
    f = write(tmp_path / "seed.jsonl", GOOD + [json.dumps({"text": "I love it", "label": "positive"}),
                                               json.dumps({"text": "I hate it", "label": "negative"})])
    report = importer.import_file(engine, settings, f)
    assert report.added == 5 and n_examples(engine) == 5
    assert report.class_balance["counts"] == {"positive": 1, "negative": 1}
    with session(engine) as s:
        ex = s.exec(select(Example).where(Example.source_ref == "seed.jsonl:1")).one()
    assert ex.prompt[0] == {"role": "system", "content": "Be brief."} and ex.chosen == "4"


def test_reimport_adds_nothing(engine, settings, tmp_path):
    f = write(tmp_path / "seed.jsonl", GOOD)
    importer.import_file(engine, settings, f)
    again = importer.import_file(engine, settings, f)
    assert (again.added, again.already_present) == (0, 3)
    assert n_examples(engine) == 3


@pytest.mark.parametrize("line,message", [
    (b'{"prompt": "hi", "completion": ', "not valid JSON"),
    (b'{"prompt": "hi"}', "missing field 'completion'"),
    (b'{"prompt": "hi", "completion": 42}', "must be a string, got int"),
    (b'{"messages": "hello"}', "non-empty list"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "last message must be the assistant"),
    (b'["a", "b"]', "expected a JSON object"),
    (b'{"question": "hi"}', "unknown shape"),
    (b'{"prompt": "caf\xe9", "completion": "x"}', "not valid UTF-8"),
    (b'{"prompt": "' + b"x" * (10 << 20) + b'", "completion": "x"}', "above the 1 MB limit"),
])
def test_bad_line_is_named_and_nothing_is_written(engine, settings, tmp_path, line, message):
    f = write(tmp_path / "bad.jsonl", [GOOD[0], line, GOOD[1]])
    with pytest.raises(ImportFailed) as e:
        importer.import_file(engine, settings, f)
    assert "line 2: " + message.split(" got")[0] in str(e.value) or ("line 2" in str(e.value) and message in str(e.value))
    assert "nothing was imported" in str(e.value)
    assert n_examples(engine) == 0


def test_empty_file(engine, settings, tmp_path):
    with pytest.raises(ImportFailed, match="empty"):
        importer.import_file(engine, settings, write(tmp_path / "empty.jsonl", [b"", b"  "]))


def test_unknown_label_against_recorded_set(engine, settings, tmp_path):
    lines = ['{"text": "good", "label": "pos"}', '{"text": "bad", "label": "neg"}']
    importer.import_file(engine, settings, write(tmp_path / "a.jsonl", lines))
    bad = write(tmp_path / "b.jsonl", ['{"text": "so-so", "label": "neutral"}'])
    with pytest.raises(ImportFailed, match="unknown label 'neutral'; known labels: neg, pos"):
        importer.import_file(engine, settings, bad)
    assert importer.import_file(engine, settings, bad, labels=["neutral"]).added == 1


def test_skip_invalid_imports_good_lines_and_reports_bad(engine, settings, tmp_path):
    f = write(tmp_path / "mixed.jsonl", [GOOD[0], b"{broken", GOOD[1], b'{"prompt": 1, "completion": "x"}'])
    report = importer.import_file(engine, settings, f, skip_invalid=True)
    assert report.added == 2 and n_examples(engine) == 2
    assert [r.split(":")[0] for r in report.invalid] == ["line 2", "line 4"]


def test_cleaning_normalizes_and_drops_with_reasons(settings):
    recs = [parse.Record(prompt=[{"role": "user", "content": "  hi \r\n\r\n\r\n\r\nthere  "}], chosen="ok  \n"),
            parse.Record(prompt=[{"role": "user", "content": "   "}], chosen="x"),
            parse.Record(prompt=[{"role": "user", "content": "q"}], chosen=""),
            parse.Record(prompt=[{"role": "user", "content": "q" * 50}], chosen="x")]
    kept, dropped = parse.clean(recs, max_chars=40)
    assert [r.prompt[0]["content"] for r in kept] == ["hi\n\nthere"] and kept[0].chosen == "ok"
    assert dropped == {"empty": 2, "too long": 1}


def test_unicode_survives_import_and_export(engine, settings, tmp_path):
    tricky = "مرحبا \u200b zero\u200dwidth 👩‍👩‍👧 \u202eRTL"
    f = write(tmp_path / "u.jsonl", [json.dumps({"prompt": tricky, "completion": tricky}, ensure_ascii=False)])
    importer.import_file(engine, settings, f)
    built = examples.build(engine)
    split = next(k for k, v in built.splits.items() if v)
    out = tmp_path / "u-out.jsonl"
    export.write(built, "sft", split, out)
    row = json.loads(out.read_text(encoding="utf-8"))
    assert row["messages"][0]["content"] == tricky and row["messages"][1]["content"] == tricky


def test_split_is_stable_and_frozen(engine, settings, tmp_path):
    lines = [json.dumps({"prompt": f"Question number {i} about topic {i * 7}", "completion": f"Answer {i}"}) for i in range(300)]
    importer.import_file(engine, settings, write(tmp_path / "a.jsonl", lines[:200]))
    with session(engine) as s:
        before = dict(s.exec(select(SplitKey.key, SplitKey.split)).all())
    counts = {sp: list(before.values()).count(sp) for sp in dataset.SPLITS}
    assert 130 <= counts["train"] <= 190 and counts["test"] >= 8  # about 80/10/10
    importer.import_file(engine, settings, write(tmp_path / "b.jsonl", lines[200:]))
    with session(engine) as s:
        after = dict(s.exec(select(SplitKey.key, SplitKey.split)).all())
    assert {k: after[k] for k in before} == before  # old examples never move
    shares = {sp: list(after.values()).count(sp) / len(after) for sp in dataset.SPLITS}
    assert all(abs(shares[sp] - r) <= 0.03 for sp, r in zip(dataset.SPLITS, settings.split_ratios, strict=False)), shares


def templated(words: list[str], labels=("noun", "verb", "adjective", "adverb")) -> list[str]:
    return [json.dumps({"text": f"What part of speech is the English word '{w}'? Answer with one word: noun, verb, adjective or adverb.",
                        "label": labels[i % len(labels)]}) for i, w in enumerate(words)]


def test_templated_data_keeps_every_example_and_splits_80_10_10(engine, settings, tmp_path):
    """One instruction, one word that varies: each row is its own example, not a twin of the first."""
    words = [f"{a}{b}{c}" for a in "bcdfg" for b in "aeiou" for c in "lmnprst"][:170]
    report = importer.import_file(engine, settings, write(tmp_path / "pos.jsonl", templated(words)))
    assert report.added == 170 and report.near_duplicates["grouped"] == 0 and not report.warnings
    assert report.near_duplicates["template_bigrams"] >= 10  # the shared instruction was recognized
    for sp, r in zip(dataset.SPLITS, settings.split_ratios, strict=False):
        assert abs(report.splits[sp] / 170 - r) <= 0.03, report.splits
    built = examples.build(engine)
    assert {k: len(v) for k, v in built.splits.items()} == report.splits  # nothing collapsed, nothing decontaminated
    assert not built.duplicates and not built.decontaminated


def test_paraphrases_still_group_among_templated_data(engine, settings, tmp_path):
    words = [f"{a}{b}{c}" for a in "bcdfg" for b in "aeiou" for c in "lmnprst"][:60]
    importer.import_file(engine, settings, write(tmp_path / "pos.jsonl", templated(words)))
    base = "Please explain in simple words how photosynthesis works in green plants and algae today"
    lines = [json.dumps({"prompt": t, "completion": f"v{i}"}) for i, t in enumerate([base, base + " please", base + " thanks"])]
    copies = [templated(words[:1])[0], templated(words[1:2])[0].replace("What part", "what PART")]  # re-sent rows
    report = importer.import_file(engine, settings, write(tmp_path / "t.jsonl", lines + copies))
    assert report.already_present == 1  # the exact copy adds nothing
    assert report.near_duplicates["grouped"] == 3, report.near_duplicates  # two paraphrases + a re-cased stored prompt
    assert report.warnings and "collapse" in report.warnings[0]  # 3 of 5 lines: more than a quarter
    built = examples.build(engine)
    assert len(built.duplicates) == 3 and len(built.splits["train"]) + len(built.splits["val"]) + len(built.splits["test"]) == 61


def test_near_duplicates_share_split_and_collapse_to_best_rated(engine, settings, tmp_path):
    base = "Please explain in simple words how photosynthesis works in green plants and algae today"
    twins = [base, base + " please", base.upper() + "?!"]  # bigram Jaccard 0.94 and 1.0 after normalizing
    lines = [json.dumps({"prompt": t, "completion": f"v{i}"}) for i, t in enumerate(twins)]
    importer.import_file(engine, settings, write(tmp_path / "t.jsonl", lines))
    with session(engine) as s:
        splits = set(s.exec(select(SplitKey.split)).all())
        ids = s.exec(select(Example.id).order_by(Example.id)).all()
        s.get(Example, ids[0]).rating = 1  # the first is the best-rated
    assert len(splits) == 1  # all three twins landed in one split
    built = examples.build(engine)
    kept = [it for v in built.splits.values() for it in v]
    assert [it.id for it in kept] == [ids[0]] and len(built.duplicates) == 2


def test_test_never_has_a_twin_in_train(engine, settings, tmp_path):
    lines = [json.dumps({"prompt": f"Tell me about item {i} and its {i % 13} neighbours in the catalogue", "completion": "ok"})
             for i in range(400)]
    importer.import_file(engine, settings, write(tmp_path / "c.jsonl", lines))
    built = examples.build(engine)  # raises LeakError on overlap
    train_prompts = {dataset.key_text(dataset.prompt_text(it.prompt)) for it in built.splits["train"]}
    assert not any(dataset.key_text(dataset.prompt_text(it.prompt)) in train_prompts for it in built.splits["test"])


def test_leak_check_fires(tmp_path):
    a = dataset.Item(1, [{"role": "user", "content": "the same question about the weather in Paris"}], "x", None, 0, "train", "import")
    b = dataset.Item(2, [{"role": "user", "content": "The same question about the weather in Paris!"}], "y", None, 0, "test", "import")
    sigs = dataset.signatures([dataset.prompt_text(a.prompt), dataset.prompt_text(b.prompt)])
    with pytest.raises(examples.LeakError, match="twin in train"):
        examples.check_no_leak(examples.Built({"train": [a], "val": [], "test": [b]}),
                               {"train": sigs[:1], "val": sigs[:0], "test": sigs[1:]})


def test_export_formats_and_manifest(engine, settings, tmp_path):
    item = dataset.Item(1, [{"role": "user", "content": "Capital of France?"}], "Paris.", "Lyon.", 1, "train", "feedback", 9)
    assert dataset.sft_rows(item) == [{"messages": [{"role": "user", "content": "Capital of France?"},
                                                    {"role": "assistant", "content": "Paris."}]}]
    assert dataset.dpo_rows(item)[0]["chosen"] == [{"role": "assistant", "content": "Paris."}]
    assert [r["label"] for r in dataset.kto_rows(item)] == [True, False]
    liked_only = dataset.Item(2, item.prompt, "Paris.", None, 1, "train", "feedback", 10)
    assert dataset.dpo_rows(liked_only) == [] and len(dataset.kto_rows(liked_only)) == 1
    importer.import_file(engine, settings, write(tmp_path / "s.jsonl", GOOD))
    built = examples.build(engine)
    split = next(k for k, v in built.splits.items() if v)
    m = export.write(built, "sft", split, tmp_path / "out.jsonl")
    on_disk = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert on_disk["rows"] == m["rows"] == len((tmp_path / "out.jsonl").read_text().splitlines())
    import hashlib
    assert on_disk["sha256"] == hashlib.sha256((tmp_path / "out.jsonl").read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="format 'xml'"):
        export.write(examples.build(engine), "xml", "train", tmp_path / "x.jsonl")


def test_resplit_repairs_old_splits_and_never_moves_test_into_train(engine, settings, tmp_path):
    """A database from the old rule: one templated file collapsed into test (as the issue saw: 406/3/11),
    and a cycle from before runs recorded what they scored, so every test prompt counts as scored."""
    from data_store.models import TrainingRun
    from retrain import resplit

    words = [f"{a}{b}{c}" for a in "bcdfg" for b in "aeiou" for c in "lmnprst"][:100]
    importer.import_file(engine, settings, write(tmp_path / "pos.jsonl", templated(words)))
    with session(engine) as s:
        keys = sorted(s.exec(select(SplitKey.key)).all())
        old = {k: "train" if i < 10 else "val" if i < 13 else "test" for i, k in enumerate(keys)}
        for k, sp in old.items():
            s.get(SplitKey, k).split = sp
        s.add(TrainingRun(slot="old", status="succeeded", dataset={"examples": {"train": 10, "val": 3, "test": 1}}))
    dry = resplit.resplit(engine, settings.split_ratios, apply=False)
    with session(engine) as s:
        assert dict(s.exec(select(SplitKey.key, SplitKey.split)).all()) == old  # a dry run changes nothing
    report = resplit.resplit(engine, settings.split_ratios)
    assert report["moved"] == dry["moved"] and report["before"] == {"train": 10, "val": 3, "test": 87}
    with session(engine) as s:
        new = dict(s.exec(select(SplitKey.key, SplitKey.split)).all())
    assert not [k for k in keys if old[k] == "test" and new[k] != "test"]  # scored: never out of test
    assert not [k for k in keys if old[k] != "test" and new[k] == "test"]  # and nothing into it
    assert report["kept_in_test"] > 0 and sum(report["after"].values()) == 100
    assert resplit.resplit(engine, settings.split_ratios)["moved"] == {}  # a second run has nothing left to do
    examples.build(engine)  # and the leak check still holds


def test_resplit_frees_test_prompts_no_gate_scored(engine, settings, tmp_path):
    from retrain import resplit

    words = [f"{a}{b}{c}" for a in "bcdfg" for b in "aeiou" for c in "lmnprst"][:100]
    importer.import_file(engine, settings, write(tmp_path / "pos.jsonl", templated(words)))
    with session(engine) as s:
        for k in s.exec(select(SplitKey.key)).all():
            s.get(SplitKey, k).split = "test"  # the old rule's collapse, before any cycle ran
    report = resplit.resplit(engine, settings.split_ratios)
    # Held-out prompts are never trained on: the ones the rule puts in val move there, none into train.
    assert report["after"] == {"val": 10, "test": 90} and report["moved"] == {"test -> val": 10}
    assert report["kept_in_test"] == 80

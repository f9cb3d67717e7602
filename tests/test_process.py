"""The `process` stage end to end on real files: chapters or a data_path list -> texts.json + stats.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from helpers import with_section
from saepipe.cli import main
from saepipe.corpus.texts import load_texts, save_texts
from saepipe.errors import UserError
from saepipe.stages import process

HTML_TAG = re.compile(r"</?(?:div|span|sup|sub|br|p|img|a|table|tr|td|th|figure)\b[^>]*>", re.I)


def write_chapters(raw_dir: Path, chapters: dict[str, dict[str, str]]) -> Path:
    for subject, files in chapters.items():
        folder = raw_dir / f"{subject}_chapters"
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")
    return raw_dir


def chapter(number: int, *sections: tuple[str, str]) -> str:
    body = "".join(f"## {number}.{i} {title}\n\n{text}\n\n" for i, (title, text) in enumerate(sections, 1))
    return f"# Chapter {number}: Title {number}\n\n{body}"


PROSE = "This sentence has exactly eight words in it."  # 8 words

SMALL_CORPUS = {
    "physics": {
        # sorted by file name: ch02 before ch10 although written in the other order
        "physics_ch10_late.md": chapter(10, ("Late", PROSE)),
        "physics_ch02_early.md": chapter(2, ("Early", PROSE), ("Short", "Too few words."), ("Empty", "")),
        "notes.txt": "not a chapter",
    },
    "chemistry": {"chemistry_ch01_atoms.md": chapter(1, ("Atoms", f"{PROSE} $E = mc^{{2}}$"))},
}


def run_process(repo_params, tmp_path: Path, out: str = "out", **changes) -> tuple[list[str], dict]:
    changes.setdefault("raw_dir", str(tmp_path / "raw"))
    changes.setdefault("subjects", ["physics", "chemistry"])
    params = with_section(repo_params, "process", output_dir=str(tmp_path / out), **changes)
    process.run(params)
    texts = json.loads((tmp_path / out / "texts.json").read_text(encoding="utf-8"))
    stats = json.loads((tmp_path / out / "stats.json").read_text(encoding="utf-8"))
    return texts, stats


def assert_stats_match(texts: list[str], stats: dict) -> None:
    assert stats["documents"] == len(texts)
    assert stats["characters"] == sum(map(len, texts))
    assert stats["words"] == sum(len(t.split()) for t in texts)
    for key in ("documents", "characters", "words", "chapters", "dropped_sections", "empty_sections"):
        assert stats[key] == sum(s[key] for s in stats["subjects"].values()), key


def test_chapters_become_section_documents_in_subject_then_file_order(repo_params, tmp_path, capsys):
    write_chapters(tmp_path / "raw", SMALL_CORPUS)
    texts, stats = run_process(repo_params, tmp_path, min_words=8)
    # each chapter's title is the first line of its first document
    assert [t.split("\n")[0] for t in texts] == ["Chapter 2: Title 2", "Chapter 10: Title 10", "Chapter 1: Title 1"]
    assert texts[0] == f"Chapter 2: Title 2\n\n2.1 Early\n\n{PROSE}"
    assert texts[2].endswith("$E = mc^{2}$")
    assert list(stats["subjects"]) == ["physics", "chemistry"]
    physics = stats["subjects"]["physics"]
    assert (physics["chapters"], physics["documents"], physics["dropped_sections"]) == (2, 2, 1)
    # only the "Empty" section: a title-only section is folded into the next, not counted as empty
    assert physics["empty_sections"] == 1
    assert stats["subjects"]["chemistry"]["documents"] == 1
    assert_stats_match(texts, stats)
    out = capsys.readouterr().out.strip().splitlines()
    line, seconds = re.fullmatch(r"(.*) \[(\d+\.\d) s\]", out[-1]).groups()  # ends with its duration, as every stage
    assert line == (
        f"process: 3 documents, {stats['characters']:,} characters from 3 chapters "
        f"(physics 2, chemistry 1) -> {tmp_path / 'out' / 'texts.json'}"
    )
    assert 0 <= float(seconds) < 60


def test_one_document_from_one_chapter_is_singular(repo_params, tmp_path, capsys):
    """A count of one takes the singular noun (the old line said `1 documents ... from 1 chapters`)."""
    write_chapters(tmp_path / "raw", {"chemistry": SMALL_CORPUS["chemistry"]})
    texts, stats = run_process(repo_params, tmp_path, subjects=["chemistry"])
    assert len(texts) == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"process: 1 document, {stats['characters']:,} characters from 1 chapter (chemistry 1) ")


def test_min_words_filters_short_sections(repo_params, tmp_path):
    write_chapters(tmp_path / "raw", SMALL_CORPUS)
    kept_all, stats_all = run_process(repo_params, tmp_path, out="a", min_words=0)
    assert "2.2 Short\n\nToo few words." in kept_all
    assert stats_all["dropped_sections"] == 0
    # words include the title and heading: Early/Late have 4 + 2 + 8, Atoms 4 + 2 + 8 + 3 (formula), Short 2 + 3
    kept_some, stats_some = run_process(repo_params, tmp_path, out="b", min_words=14)  # exactly 14 is kept
    assert [t.split("\n")[2] for t in kept_some] == ["2.1 Early", "10.1 Late", "1.1 Atoms"]
    assert stats_some["dropped_sections"] == 1
    kept_few, stats_few = run_process(repo_params, tmp_path, out="c", min_words=15)
    assert kept_few == [f"Chapter 1: Title 1\n\n1.1 Atoms\n\n{PROSE} $E = mc^{{2}}$"]
    assert stats_few["dropped_sections"] == 3
    assert_stats_match(kept_few, stats_few)


def test_title_moves_past_a_section_too_short_to_keep(repo_params, tmp_path):
    long_prose = f"{PROSE} {PROSE}"
    corpus = {"physics": {"physics_ch04.md": chapter(4, ("Intro", "Just a few words."), ("Forces", long_prose))}}
    write_chapters(tmp_path / "raw", corpus)
    texts, stats = run_process(repo_params, tmp_path, subjects=["physics"], min_words=12)
    assert texts == [f"Chapter 4: Title 4\n\n4.2 Forces\n\n{long_prose}"]
    assert stats["dropped_sections"] == 1


def test_nul_bytes_are_removed_with_a_warning_naming_the_file(repo_params, tmp_path, capsys):
    corpus = {"physics": {"physics_ch05.md": chapter(5, ("Waves", PROSE.replace("exactly", "exa\x00\x00ctly")))}}
    write_chapters(tmp_path / "raw", corpus)
    texts, _ = run_process(repo_params, tmp_path, subjects=["physics"], min_words=8)
    assert texts == [f"Chapter 5: Title 5\n\n5.1 Waves\n\n{PROSE}"]
    err = capsys.readouterr().err
    assert "physics_ch05.md: removed 2 NUL bytes" in err


def test_no_section_long_enough_is_an_error(repo_params, tmp_path):
    write_chapters(tmp_path / "raw", SMALL_CORPUS)
    with pytest.raises(UserError, match=r"process\.min_words=1000"):
        run_process(repo_params, tmp_path, min_words=1000)
    assert not (tmp_path / "out").exists()


def test_output_is_byte_identical_across_runs(repo_params, tmp_path):
    write_chapters(tmp_path / "raw", SMALL_CORPUS)
    run_process(repo_params, tmp_path, out="first")
    run_process(repo_params, tmp_path, out="second")
    for name in ("texts.json", "stats.json"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()


def test_missing_subject_folder_is_a_user_error(repo_params, tmp_path):
    write_chapters(tmp_path / "raw", SMALL_CORPUS)
    with pytest.raises(UserError, match=r"process\.raw_dir.*'biology'") as info:
        run_process(repo_params, tmp_path, subjects=["physics", "biology"])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_subject_folder_without_markdown_is_a_user_error(repo_params, tmp_path):
    write_chapters(tmp_path / "raw", {"biology": {"readme.txt": "no chapters"}, **SMALL_CORPUS})
    with pytest.raises(UserError, match=r"process\.raw_dir.*'biology'.*no \.md"):
        run_process(repo_params, tmp_path, subjects=["physics", "biology"])


def test_data_path_list_is_copied_as_is(repo_params, tmp_path, capsys):
    texts = ["First document, ünïcode and $x_1$.", "  second  ", "short"]
    source = tmp_path / "mine.json"
    source.write_text(json.dumps(texts), encoding="utf-8")
    copied, stats = run_process(repo_params, tmp_path, data_path=str(source), raw_dir=str(tmp_path / "nowhere"),
                                min_words=1)
    assert copied == texts
    assert list(stats["subjects"]) == ["data_path"]
    assert stats["subjects"]["data_path"]["chapters"] == 0
    assert_stats_match(copied, stats)
    assert re.search(rf"from data_path {re.escape(str(source))} -> {re.escape(str(tmp_path / 'out' / 'texts.json'))} "
                     r"\[\d+\.\d s\]$", capsys.readouterr().out.strip())


def test_data_path_texts_pass_the_min_words_filter(repo_params, tmp_path):
    source = tmp_path / "mine.json"
    source.write_text(json.dumps(["", "two words", PROSE, "   "]), encoding="utf-8")
    kept, stats = run_process(repo_params, tmp_path, data_path=str(source), min_words=8)
    assert kept == [PROSE]
    data = stats["subjects"]["data_path"]
    assert (data["documents"], data["dropped_sections"], data["empty_sections"]) == (1, 1, 2)
    assert stats["min_words"] == 8


def test_data_path_with_nothing_long_enough_is_an_error(repo_dir, tmp_path, capsys):
    source = tmp_path / "blank.json"
    source.write_text('["", "   "]', encoding="utf-8")
    params = write_params_file(repo_dir, tmp_path)
    assert main(["process", "--params", str(params), "--data-path", str(source)]) == 2
    err = capsys.readouterr().err.strip()
    assert "process.min_words=" in err and str(source) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


BAD_DATA = {
    "missing": (None, "file not found"),
    "invalid_json": ('["unterminated', "not valid JSON"),
    "object": ('{"texts": ["a"]}', "holds a JSON object"),
    "string": ('"just one text"', "holds a JSON string"),
    "non_string_item": ('["a", "b", 3, "d"]', "item 2 is a JSON number"),
    "null_item": ('["a", null]', "item 1 is a JSON null"),
    "empty": ("[]", "the list is empty"),
}


def write_bad(tmp_path: Path, case: str) -> Path:
    content = BAD_DATA[case][0]
    path = tmp_path / f"{case}.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", BAD_DATA)
def test_load_texts_rejects_bad_lists_with_one_line(tmp_path, case):
    path = write_bad(tmp_path, case)
    with pytest.raises(UserError) as info:
        load_texts(path)
    message = str(info.value)
    assert BAD_DATA[case][1] in message
    assert str(path) in message and "expected a JSON list of strings" in message
    assert "\n" not in message


def test_save_then_load_round_trips(tmp_path):
    texts = ["α β γ", 'quotes " and \\ backslash', "line\nbreak"]
    save_texts(tmp_path / "deep" / "texts.json", texts)
    assert load_texts(tmp_path / "deep" / "texts.json") == texts
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["texts.json"]  # no temp file left


def write_params_file(repo_dir: Path, tmp_path: Path) -> Path:
    raw = yaml.safe_load((repo_dir / "params.yaml").read_text(encoding="utf-8"))
    raw["process"]["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", ["missing", "object", "non_string_item", "empty"])
def test_cli_bad_data_path_exits_2_with_one_line(repo_dir, tmp_path, capsys, case):
    bad = write_bad(tmp_path, case)
    code = main(["process", "--params", str(write_params_file(repo_dir, tmp_path)), "--data-path", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith("saepipe process: error: ") and str(bad) in err[0] and BAD_DATA[case][1] in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_good_data_path(repo_dir, tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([PROSE, f"Another. {PROSE}"]), encoding="utf-8")
    assert main(["process", "--params", str(write_params_file(repo_dir, tmp_path)), "--data-path", str(good)]) == 0
    assert load_texts(tmp_path / "out" / "texts.json") == [PROSE, f"Another. {PROSE}"]
    assert "process: 2 documents" in capsys.readouterr().out


def markdown_files(root: Path, subjects: list[str]) -> dict[str, list[Path]]:
    return {s: sorted((root / f"{s}_chapters").glob("*.md")) for s in subjects}


def test_shared_corpus(repo_params, shared_corpus, tmp_path):
    subjects = ["physics", "chemistry", "biology"]
    files = markdown_files(shared_corpus, subjects)
    sources = {s: [p.read_text(encoding="utf-8") for p in paths] for s, paths in files.items()}
    texts, stats = run_process(repo_params, tmp_path, raw_dir=str(shared_corpus), subjects=subjects)

    assert_stats_match(texts, stats)
    assert list(stats["subjects"]) == subjects
    for subject in subjects:
        sub = stats["subjects"][subject]
        assert sub["chapters"] == len(files[subject]) > 0
        assert sub["documents"] >= sub["chapters"]
    # one document per `## ` section, give or take a few empty or tiny ones (the chapter heading
    # blocks hold no prose of their own)
    sections = sum(len(re.findall(r"^## ", text, re.M)) for texts_ in sources.values() for text in texts_)
    chapters = sum(map(len, files.values()))
    assert 0.9 * sections <= len(texts) <= sections + chapters
    assert stats["dropped_sections"] + stats["empty_sections"] <= chapters + 0.1 * sections
    # cleaning removes markup only (a few % of the bytes), never whole passages
    source_chars = sum(len(t) for texts_ in sources.values() for t in texts_)
    assert stats["source_characters"] == source_chars
    assert 0.9 * source_chars <= stats["characters"] < source_chars

    for text in texts:
        assert "![" not in text and not HTML_TAG.search(text) and "<!--" not in text
        assert not re.search(r"^#{1,6} |^\|?\s*:?-{3,}:?\s*\|", text, re.M)
        assert "\x00" not in text and "\x01" not in text and "\n\n\n" not in text
        assert text == text.strip() and not re.search(r"[ \t]$", text, re.M)
    assert any("$$" in text for text in texts)
    assert sum(text.count("$") for text in texts) > 1000


def test_default_corpus(repo_dir, repo_params, tmp_path):
    if len(list((repo_dir / "data" / "raw").glob("*_chapters/*.md"))) < 15:
        pytest.skip("default corpus not complete yet")
    texts, stats = run_process(repo_params, tmp_path, raw_dir=str(repo_dir / "data" / "raw"),
                               subjects=repo_params.process.subjects)
    assert_stats_match(texts, stats)
    assert list(stats["subjects"]) == repo_params.process.subjects
    assert all(s["chapters"] > 0 and s["documents"] > 0 for s in stats["subjects"].values())
    assert stats["words"] >= 20_000


def test_labels_name_each_documents_subject_and_chapter(repo_params, tmp_path):
    from saepipe.corpus.labels import load_labels

    write_chapters(tmp_path / "raw", SMALL_CORPUS)
    texts, _ = run_process(repo_params, tmp_path, min_words=8)
    labels = load_labels(tmp_path / "out" / "labels.json", len(texts))
    assert labels == [{"subject": "physics", "chapter": "physics_ch02_early"},
                      {"subject": "physics", "chapter": "physics_ch10_late"},
                      {"subject": "chemistry", "chapter": "chemistry_ch01_atoms"}]
    with pytest.raises(UserError, match="labels 3 documents but the token cache holds 4"):
        load_labels(tmp_path / "out" / "labels.json", 4)


def test_missing_labels_name_the_command_that_writes_them(tmp_path):
    """A missing labels.json (the probes need it) says which command makes it, not only that it is missing."""
    from saepipe.corpus.labels import load_labels

    with pytest.raises(UserError, match=r"labels\.json.*run `saepipe process`"):
        load_labels(tmp_path / "labels.json", 3)


def test_data_path_documents_are_labelled_unknown(repo_params, tmp_path):
    source = tmp_path / "mine.json"
    source.write_text(json.dumps([PROSE, "short", f"Another. {PROSE}"]), encoding="utf-8")
    run_process(repo_params, tmp_path, data_path=str(source), min_words=8)
    labels = json.loads((tmp_path / "out" / "labels.json").read_text(encoding="utf-8"))
    assert labels == [{"subject": "unknown", "chapter": "unknown"}] * 2

"""Stage `process`: Markdown chapters (or an existing document list) -> texts.json, labels.json, stats.json.

The cleaning itself lives in `saepipe.corpus.markdown`; this module only finds the chapters, counts,
and writes. Every subject folder is checked before any file is read, so a typo in
`process.subjects` fails at once instead of after minutes of work.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from saepipe.config import Params, ProcessConfig
from saepipe.corpus.labels import UNKNOWN, save_labels
from saepipe.corpus.markdown import clean_sections
from saepipe.corpus.texts import load_texts, save_texts
from saepipe.errors import UserError
from saepipe.paths import CORPUS_STATS, LABELS, TEXTS
from saepipe.storage import write_json
from saepipe.text import count


def long_enough(text: str, min_words: int) -> bool:
    """The one `min_words` rule, for chapter sections and data_path texts alike."""
    return len(text.split()) >= min_words


@dataclass
class SubjectStats:
    """Counts for one subject (or for the `data_path` list); written to stats.json as-is."""

    chapters: int = 0
    documents: int = 0
    characters: int = 0
    words: int = 0
    empty_sections: int = 0
    dropped_sections: int = 0
    source_characters: int = 0

    def add_document(self, text: str) -> None:
        self.documents += 1
        self.characters += len(text)
        self.words += len(text.split())

    def offer(self, text: str, min_words: int, texts: list[str]) -> bool:
        """Keep `text` as a document when it has at least `min_words` words, counting what is dropped."""
        if not text.strip():
            self.empty_sections += 1
        elif not long_enough(text, min_words):
            self.dropped_sections += 1
        else:
            texts.append(text)
            self.add_document(text)
            return True
        return False


@dataclass
class Corpus:
    texts: list[str] = field(default_factory=list)
    labels: list[dict[str, str]] = field(default_factory=list)
    """Each document's subject and chapter (its file's stem), aligned with `texts`."""
    subjects: dict[str, SubjectStats] = field(default_factory=dict)


def chapter_files(raw_dir: Path, subjects: list[str]) -> dict[str, list[Path]]:
    """Each subject's `*.md` chapters, sorted by name; a UserError for a missing or empty folder."""
    files = {}
    for subject in subjects:
        folder = raw_dir / f"{subject}_chapters"
        if not folder.is_dir():
            raise UserError(f"process.raw_dir={str(raw_dir)!r}: no folder {folder} for subject {subject!r} "
                            "(expected <raw_dir>/<subject>_chapters/ holding Markdown chapters)")
        chapters = sorted(folder.glob("*.md"), key=lambda p: p.name)
        if not chapters:
            raise UserError(f"process.raw_dir={str(raw_dir)!r}: {folder} for subject {subject!r} "
                            "holds no .md chapters")
        files[subject] = chapters
    return files


def read_chapters(files: dict[str, list[Path]], min_words: int) -> Corpus:
    """Split every chapter into section documents, dropping those under `min_words` words."""
    corpus = Corpus(subjects={subject: SubjectStats() for subject in files})
    todo = [(subject, path) for subject, paths in files.items() for path in paths]
    for subject, path in tqdm(todo, desc="process", unit="chapter", disable=None):
        stats = corpus.subjects[subject]
        try:
            markdown = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text (expected a Markdown chapter)") from None
        if "\x00" in markdown:
            nul = markdown.count("\x00")
            tqdm.write(f"process: warning: {path}: removed {count(nul, 'NUL byte')}", file=sys.stderr)
            markdown = markdown.replace("\x00", "")
        stats.chapters += 1
        stats.source_characters += len(markdown)
        for text in clean_sections(markdown, lambda doc: long_enough(doc, min_words)):
            if stats.offer(text, min_words, corpus.texts):
                corpus.labels.append({"subject": subject, "chapter": path.stem})
    return corpus


def read_data_path(path: str, min_words: int) -> Corpus:
    """An existing document list, through the same `min_words` filter as the chapters' sections."""
    stats = SubjectStats()
    corpus = Corpus(subjects={"data_path": stats})
    for text in load_texts(path):
        stats.source_characters += len(text)
        if stats.offer(text, min_words, corpus.texts):
            corpus.labels.append({"subject": UNKNOWN, "chapter": UNKNOWN})
    return corpus


def corpus_stats(corpus: Corpus, config: ProcessConfig) -> dict[str, Any]:
    """stats.json: totals first (DVC metrics), then the per-subject breakdown."""
    per_subject = {name: vars(stats) for name, stats in corpus.subjects.items()}
    totals = {key: sum(s[key] for s in per_subject.values()) for key in vars(SubjectStats())}
    return {
        "source": config.data_path if config.data_path else config.raw_dir,
        "min_words": config.min_words,
        **totals,
        "subjects": per_subject,
    }


def summary_line(stats: dict[str, Any], texts_path: Path, seconds: float) -> str:
    """One line a person reads at the end of `dvc repro`."""
    subjects = stats["subjects"]
    if "data_path" in subjects:
        origin = f"data_path {stats['source']}"
    else:
        parts = ", ".join(f"{name} {s['documents']:,}" for name, s in subjects.items())
        origin = f"{count(stats['chapters'], 'chapter')} ({parts})"
    counts = f"{count(stats['documents'], 'document')}, {count(stats['characters'], 'character')}"
    return f"process: {counts} from {origin} -> {texts_path} [{seconds:.1f} s]"


def run(params: Params) -> None:
    started = time.perf_counter()
    config = params.process
    if config.data_path:
        corpus = read_data_path(config.data_path, config.min_words)
    else:
        corpus = read_chapters(chapter_files(Path(config.raw_dir), config.subjects), config.min_words)
    if not corpus.texts:
        source = config.data_path or config.raw_dir
        raise UserError(f"process.min_words={config.min_words}: no document of {source} has that many words; "
                        "nothing to write")
    output_dir = Path(config.output_dir)
    texts_path = output_dir / TEXTS
    stats = corpus_stats(corpus, config)
    save_texts(texts_path, corpus.texts)
    save_labels(output_dir / LABELS, corpus.labels)
    write_json(output_dir / CORPUS_STATS, stats)
    print(summary_line(stats, texts_path, time.perf_counter() - started))

"""The activation DB (`analysis/<run>/activation_db.h5`): an SAE's features on every cached token, and its reader.

Layout (HDF5), written by `analysis.db_build` and read only here:
    attrs      format="saepipe.activation_db", format_version, d_sae, d_in, n_rows, nnz, splits, outlier_rows,
               outliers_included, counted_rows (n_rows less the outlier rows left without features),
               values_dtype, quantiles (the levels of features/quantiles), sae_path, sae_sha256 (of its
               weights file), sae_type, model_name, hook, activation_cache, token_cache,
               tokenizer_fingerprint, texts_sha256 (of the corpus the token cache holds), saepipe_version
    rows/      one entry per token row, in activation-cache order (train rows first, then validation)
        token_id  int32     doc_id  int32     position  int32 (in its document)     split  int8 (0 train, 1 validation)
        outlier  bool (the cache's massive-activation flag; such rows have no features unless outliers_included)
    csr/       token-major: row r's features are features[indptr[r]:indptr[r+1]] (ascending), with values
        indptr  int64 [n_rows + 1]     features  int32 [nnz]     values  float16 | float32 [nnz]
    csc/       feature-major reverse index: feature f's rows are rows[indptr[f]:indptr[f+1]], sorted by
               activation, descending (ties by row), so its top examples are the head of one slice and
               the q-quantile of its activations is one index away
        indptr  int64 [d_sae + 1]     rows  int32 [nnz]     values  as csr/values
    features/  per feature, over the tokens it fires on (activation > 0):
        count  int64     density  float64 (count / counted_rows)     sum  float64     mean  float32 (sum / count)
        max  float32     quantiles  float32 [d_sae, len(quantiles)] (nearest rank, numpy's method="lower")
    docs/      document d's rows are rows_by_position[offsets[d]:offsets[d+1]], for positions
               first_position[d], first_position[d] + 1, ... (every cached token of a document is in the DB)
        offsets  int64 [n_docs + 1]     first_position  int32 [n_docs]     rows_by_position  int32 [n_rows]

Values are what the SAE's inference encode gives on the raw cached activation (BatchTopK with its
exported threshold), rounded to `values_dtype`; every statistic is computed from the stored values.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saepipe.corpus.tokens import TokenCache
from saepipe.errors import UserError
from saepipe.paths import EXPORT_CONFIG, EXPORT_WEIGHTS, SAELENS_WEIGHTS
from saepipe.storage import OpenFile, open_h5, plain, sha256_file

FORMAT = "saepipe.activation_db"
FORMAT_VERSION = 2  # 2: the SAE's hook is one attribute, `hook`
SPLIT_CODES = {"train": 0, "validation": 1}
STAT_FIELDS = ("count", "density", "sum", "mean", "max")
SEARCH_OCCURRENCES = 2000
"""`search_tokens` averages over at most this many occurrences of the token (the first ones)."""


def sae_weights_sha256(sae_path: str | Path) -> str:
    """The hash that names an exported SAE: of saepipe's weights.pt, else of SAELens's safetensors."""
    path = Path(sae_path)
    for name in (EXPORT_WEIGHTS, SAELENS_WEIGHTS):
        if (path / name).is_file():
            return sha256_file(path / name)
    what = "is not a directory" if not path.is_dir() else f"holds no {EXPORT_WEIGHTS} or {SAELENS_WEIGHTS}"
    raise UserError(f"SAE not found: {path} {what} (run `saepipe export` first)")


SAE_FIELDS = ("sae_type", "d_in", "d_sae", "model_name", "hook")
"""Attributes the DB copies from the SAE's export config.json, compared when the SAE has changed."""


def sae_changes(attrs: dict[str, Any], sae_path: str | Path, sha256: str) -> list[str]:
    """What tells the SAE at `sae_path` (weights hash `sha256`) from the one a DB with `attrs` was built from,
    each as 'what old -> new': the weights' digest, its folder, and the config fields the export still has."""
    changes = [f"weights sha256 {str(attrs.get('sae_sha256'))[:12]} -> {sha256[:12]}"]
    if str(attrs.get("sae_path")) != str(sae_path):
        changes.append(f"path {attrs.get('sae_path')} -> {sae_path}")
    try:
        config = json.loads((Path(sae_path) / EXPORT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict):
        changes += [f"{name} {attrs[name]} -> {config[name]}" for name in SAE_FIELDS
                    if name in attrs and name in config and str(attrs[name]) != str(config[name])]
    return changes


def spellings(text: str, case_sensitive: bool = True) -> list[str]:
    """The spellings a token search matches: `text`, with a leading space if it has none, and, unless
    `case_sensitive`, both again in lower case, upper case and capitalised (each spelling once)."""
    word = text.lstrip()
    capitalised = text[: len(text) - len(word)] + word.capitalize()
    cases = [text] if case_sensitive else [text, text.lower(), text.upper(), capitalised]
    return list(dict.fromkeys(v for c in cases for v in (c, c if c.startswith(" ") else " " + c)))


@dataclass(frozen=True)
class Example:
    """A window of a document around one token where a feature fires."""

    doc: int
    position: int
    activation: float
    marked: int
    """Index of the activating token within `tokens`."""
    tokens: list[str]
    """The window's tokens, decoded one by one."""
    activations: list[float]
    """The feature's activation on each token of the window (0 where it does not fire or is not cached)."""

    def text(self) -> str:
        return "".join(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenFeature:
    """A feature as it responds to every occurrence of one token."""

    feature: int
    mean_activation: float
    """Mean over the token's occurrences, counting 0 where the feature does not fire."""
    fire_fraction: float
    occurrences: int


@dataclass(frozen=True)
class TokenFeatureTable:
    """Every token id's strongest features ([n_tokens, k] arrays, padded with feature -1 and zeros)."""

    token_ids: np.ndarray
    occurrences: np.ndarray
    """Occurrences averaged over per token (at most the table's max_occurrences)."""
    features: np.ndarray
    mean_activation: np.ndarray
    fire_fraction: np.ndarray


class ActivationDB(OpenFile):
    """Read access to a finished activation DB; `tokens` (a TokenCache or its path) and `tokenizer` are
    needed only for examples and token search (the windows' context and their text)."""

    def __init__(self, path: str | Path, tokens: TokenCache | str | Path | None = None, tokenizer: Any = None):
        self.path = Path(path)
        self.file = open_h5(self.path, "activation DB", "activation-db")
        try:
            self._open()
        except (KeyError, OSError, ValueError) as exc:
            self.file.close()
            raise UserError(f"{self.path}: a damaged or incomplete activation DB ({exc}); "
                            "rerun `saepipe activation-db`") from None
        if isinstance(tokens, (str, Path)):
            from saepipe.corpus.tokens import read_token_cache

            tokens = read_token_cache(tokens)
        self.tokens = tokens
        self.tokenizer = tokenizer

    def _open(self) -> None:
        attrs = self.file.attrs
        if attrs.get("format") != FORMAT:
            self.file.close()
            raise UserError(f"{self.path} is not a saepipe activation DB (format={attrs.get('format')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            self.file.close()
            raise UserError(f"{self.path}: activation DB version {attrs.get('format_version')}, expected "
                            f"{FORMAT_VERSION}; rerun `saepipe activation-db`")
        self.attrs: dict[str, Any] = {k: plain(v) for k, v in attrs.items()}
        self.d_sae, self.n_rows, self.nnz = int(attrs["d_sae"]), int(attrs["n_rows"]), int(attrs["nnz"])
        self.quantile_levels = [float(q) for q in np.atleast_1d(attrs["quantiles"])]
        self.csc_indptr = self.file["csc/indptr"][:]
        self.stats = {name: self.file[f"features/{name}"][:] for name in STAT_FIELDS}
        self.quantiles = self.file["features/quantiles"][:]
        self.doc_offsets = self.file["docs/offsets"][:]
        self.first_position = self.file["docs/first_position"][:]
        sizes = {"csr/features": self.nnz, "csr/values": self.nnz, "csc/rows": self.nnz, "csc/values": self.nnz,
                 "csr/indptr": self.n_rows + 1, "rows/token_id": self.n_rows}
        for name, size in sizes.items():
            if self.file[name].shape[0] != size:
                raise ValueError(f"{name} holds {self.file[name].shape[0]} entries, expected {size}")
        if len(self.csc_indptr) != self.d_sae + 1 or self.csc_indptr[-1] != self.nnz:
            raise ValueError("csc/indptr does not match nnz")

    # ---- features -------------------------------------------------------------------------------
    @property
    def counts(self) -> np.ndarray:
        return self.stats["count"]

    def _feature(self, f: int) -> int:
        if not 0 <= int(f) < self.d_sae:
            raise UserError(f"feature {f}: expected an id in [0, {self.d_sae - 1}]")
        return int(f)

    def feature_stats(self, f: int) -> dict[str, Any]:
        f = self._feature(f)
        stats: dict[str, Any] = {"feature": f, **{k: plain(v[f]) for k, v in self.stats.items()}}
        stats["alive"] = stats["count"] > 0
        stats["quantiles"] = {f"{q:g}": float(v) for q, v in zip(self.quantile_levels, self.quantiles[f], strict=True)}
        return stats

    def feature_rows(self, f: int, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rows, float32 activations) of feature f by rank, [start, stop) of its descending order."""
        f = self._feature(f)
        a, b = int(self.csc_indptr[f]), int(self.csc_indptr[f + 1])
        lo, hi = min(a + max(start, 0), b), b if stop is None else min(a + max(stop, 0), b)
        return self.file["csc/rows"][lo:hi].astype(np.int64), self.file["csc/values"][lo:hi].astype(np.float32)

    def each_feature_rows(self, max_entries: int = 1 << 24) -> Iterator[tuple[int, np.ndarray]]:
        """(f, its rows by rank) for every feature in id order, read in blocks of at most `max_entries` rows
        (one HDF5 read per block instead of one per feature; a feature larger than that is one block)."""
        f = 0
        while f < self.d_sae:
            base = int(self.csc_indptr[f])
            stop = max(int(np.searchsorted(self.csc_indptr, base + max_entries, side="right")) - 1, f + 1)
            block = self.file["csc/rows"][base : int(self.csc_indptr[stop])].astype(np.int64)
            for g in range(f, stop):
                yield g, block[int(self.csc_indptr[g]) - base : int(self.csc_indptr[g + 1]) - base]
            f = stop

    @functools.lru_cache(maxsize=64)  # noqa: B019 - the DB lives as long as its cache
    def _by_row(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        rows, values = self.feature_rows(f)
        order = np.argsort(rows, kind="stable")
        return rows[order], values[order]

    def activations_on(self, f: int, rows: np.ndarray) -> np.ndarray:
        """Feature f's activation on each of `rows` (-1 means not cached: 0)."""
        sorted_rows, values = self._by_row(self._feature(f))
        rows = np.asarray(rows, dtype=np.int64)
        if not len(sorted_rows):
            return np.zeros(len(rows), np.float32)
        at = np.searchsorted(sorted_rows, rows).clip(max=len(sorted_rows) - 1)
        return np.where((rows >= 0) & (sorted_rows[at] == rows), values[at], 0.0).astype(np.float32)

    # ---- rows and documents ------------------------------------------------------------------
    @functools.cached_property
    def row_doc(self) -> np.ndarray:
        return self.file["rows/doc_id"][:]

    @functools.cached_property
    def row_position(self) -> np.ndarray:
        return self.file["rows/position"][:]

    @functools.cached_property
    def row_token(self) -> np.ndarray:
        return self.file["rows/token_id"][:]

    @functools.cached_property
    def row_split(self) -> np.ndarray:
        return self.file["rows/split"][:]

    @functools.cached_property
    def row_outlier(self) -> np.ndarray:
        """The cache's massive-activation flag per row (such rows have no features unless outliers_included)."""
        return self.file["rows/outlier"][:]

    def row_l0(self, counted_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(features active on each row, the row's split): the per-token L0, from the CSR's row pointers.
        `counted_only` leaves out the outlier rows the DB keeps without features, as every statistic does."""
        l0 = np.diff(self.file["csr/indptr"][:])
        if counted_only:
            return l0[self.counted], self.row_split[self.counted]
        return l0, self.row_split

    @functools.cached_property
    def counted(self) -> np.ndarray:
        """The rows every statistic counts: all but the outlier rows the DB keeps without features."""
        if self.attrs.get("outliers_included", False):
            return np.ones(self.n_rows, bool)
        return ~self.row_outlier

    @functools.cached_property
    def token_totals(self) -> np.ndarray:
        """Occurrences of each token id over the counted rows (indexed by id): how common a token is, so that a
        feature's share of a token's occurrences, and the token's rarity, can be read beside its firings."""
        return np.bincount(self.row_token[self.counted])

    @functools.cached_property
    def rows_in_document_order(self) -> np.ndarray:
        """Every row, document by document, by position: document d's rows are [doc_offsets[d], doc_offsets[d+1])."""
        return self._rows_by_position

    def _document_rows(self, doc: int) -> tuple[int, np.ndarray]:
        """(first cached position, rows in position order) of one document (empty when not in the DB)."""
        if not 0 <= doc < len(self.first_position):
            raise UserError(f"document {doc}: expected an id in [0, {len(self.first_position) - 1}]")
        a, b = int(self.doc_offsets[doc]), int(self.doc_offsets[doc + 1])
        return int(self.first_position[doc]), self._rows_by_position[a:b].astype(np.int64)

    @functools.cached_property
    def _rows_by_position(self) -> np.ndarray:
        return self.file["docs/rows_by_position"][:]

    def rows_at(self, doc: int, positions: np.ndarray) -> np.ndarray:
        """The DB row of each (doc, position), -1 where that token is not cached."""
        first, rows = self._document_rows(doc)
        index = np.asarray(positions, dtype=np.int64) - first
        inside = (index >= 0) & (index < len(rows))
        return np.where(inside, rows[np.clip(index, 0, max(len(rows) - 1, 0))] if len(rows) else -1, -1)

    def row_features(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(features, float32 activations) of one row, strongest first."""
        a, b = (int(v) for v in self.file["csr/indptr"][row : row + 2])
        features = self.file["csr/features"][a:b].astype(np.int64)
        values = self.file["csr/values"][a:b].astype(np.float32)
        order = np.argsort(-values, kind="stable")
        return features[order], values[order]

    def features_at(self, doc: int, position: int) -> list[tuple[int, float]]:
        row = int(self.rows_at(doc, np.array([position]))[0])
        if row < 0:
            return []
        features, values = self.row_features(row)
        return [(int(f), float(v)) for f, v in zip(features, values, strict=True)]

    def document(self, doc: int, top: int = 3) -> list[dict[str, Any]]:
        """Each token of a document with its `top` strongest features (empty for tokens not cached)."""
        tokens = self._tokens().document(doc)
        rows = self.rows_at(doc, np.arange(len(tokens)))
        out = []
        for position, (token, row) in enumerate(zip(tokens.tolist(), rows.tolist(), strict=True)):
            features = []
            if row >= 0:
                ids, values = self.row_features(row)
                features = [(int(f), float(v)) for f, v in zip(ids[:top], values[:top], strict=True)]
            out.append({"position": position, "token": self.piece(token), "features": features})
        return out

    # ---- examples ---------------------------------------------------------------------------------
    def _tokens(self) -> TokenCache:
        if self.tokens is None or self.tokenizer is None:
            raise UserError("examples need the token cache and the tokenizer: ActivationDB(path, tokens=..., "
                            "tokenizer=...)")
        if self.tokens.attrs.get("texts_sha256") != self.attrs.get("texts_sha256"):
            raise UserError(f"the token cache does not hold the corpus {self.path} was built from; "
                            "rerun `saepipe activation-db`")
        return self.tokens

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019
    def piece(self, token_id: int) -> str:
        """One token decoded on its own."""
        return self.tokenizer.decode([int(token_id)])

    def examples(self, f: int, rows: np.ndarray, context: tuple[int, int] = (16, 4)) -> list[Example]:
        """Windows of `context` (before, after) tokens around each of `rows`, with f's activations."""
        tokens = self._tokens()
        before, after = context
        out = []
        for row in np.asarray(rows, dtype=np.int64).tolist():
            doc, position = int(self.row_doc[row]), int(self.row_position[row])
            document = tokens.document(doc)
            lo, hi = max(0, position - before), min(len(document), position + after + 1)
            window = np.arange(lo, hi)
            values = self.activations_on(f, self.rows_at(doc, window))
            out.append(Example(doc=doc, position=position, activation=float(values[position - lo]),
                               marked=position - lo, tokens=[self.piece(t) for t in document[lo:hi].tolist()],
                               activations=[round(float(v), 4) for v in values]))
        return out

    def top_examples(self, f: int, k: int = 20, context: tuple[int, int] = (16, 4)) -> list[Example]:
        rows, _ = self.feature_rows(f, 0, k)
        return self.examples(f, rows, context)

    def quantile_examples(self, f: int, q: float, k: int = 5, context: tuple[int, int] = (16, 4)) -> list[Example]:
        """k examples centred on the q-quantile of f's activations (a lower band than the top examples)."""
        if not 0.0 <= q <= 1.0:
            raise UserError(f"quantile {q}: expected a number in [0, 1]")
        n = int(self.counts[self._feature(f)])
        if n == 0:
            return []
        centre = n - 1 - int(np.floor(q * (n - 1)))  # descending rank of the q-quantile
        start = min(max(centre - k // 2, 0), max(n - k, 0))
        rows, _ = self.feature_rows(f, start, start + k)
        return self.examples(f, rows, context)

    # ---- token search -----------------------------------------------------------------------------
    def token_occurrences(self, text: str, case_sensitive: bool = True) -> np.ndarray:
        """Rows whose token ends an occurrence of `text`'s tokens (also with a leading space, if it has none;
        without `case_sensitive`, also of its lower-case, upper-case and capitalised spellings)."""
        tokens = self._tokens()
        found: list[np.ndarray] = []
        for variant in spellings(text, case_sensitive):
            ids = self.tokenizer(variant, add_special_tokens=False)["input_ids"]
            if not ids:
                continue
            rows = np.flatnonzero(self.row_token == ids[-1])
            for back, token in enumerate(reversed(ids[:-1]), 1):
                positions = self.row_position[rows].astype(np.int64) - back
                starts = tokens.offsets[self.row_doc[rows]]
                ok = positions >= 0
                ok[ok] = tokens.tokens[starts[ok] + positions[ok]] == token
                rows = rows[ok]
            found.append(rows)
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def search_tokens(self, text: str, k: int = 10, case_sensitive: bool = True) -> list[TokenFeature]:
        """The features most active, on average, on the token(s) spelled by `text` (any of its case variants
        merged into one token, without `case_sensitive`)."""
        rows = self.token_occurrences(text, case_sensitive)[:SEARCH_OCCURRENCES]
        if len(rows) == 0:
            return []
        sums = np.zeros(self.d_sae, np.float64)
        fires = np.zeros(self.d_sae, np.int64)
        indptr = self.file["csr/indptr"]
        for row in rows.tolist():
            a, b = (int(v) for v in indptr[row : row + 2])
            features = self.file["csr/features"][a:b]
            sums[features] += self.file["csr/values"][a:b].astype(np.float64)
            fires[features] += 1
        best = np.argsort(-sums, kind="stable")[:k]
        return [TokenFeature(int(f), float(sums[f] / len(rows)), float(fires[f] / len(rows)), len(rows))
                for f in best if fires[f] > 0]

    def token_feature_table(self, k: int, max_occurrences: int = SEARCH_OCCURRENCES,
                            chunk_rows: int = 1 << 16) -> TokenFeatureTable:
        """`search_tokens` for every token id in the DB at once, by its id (no spelling variants): each token's
        `k` features of highest mean activation over its first `max_occurrences` rows. One pass over the CSR:
        sums and fire counts per (token, feature) as scipy.sparse products of a token-indicator matrix."""
        import scipy.sparse

        tokens = self.row_token.astype(np.int64)
        order = np.argsort(tokens, kind="stable")  # by token, then by row
        ids, starts, counts = np.unique(tokens[order], return_index=True, return_counts=True)
        group = np.empty(self.n_rows, np.int64)
        group[order] = np.repeat(np.arange(len(ids)), counts)
        kept = np.zeros(self.n_rows, bool)
        kept[order[np.arange(self.n_rows) - np.repeat(starts, counts) < max_occurrences]] = True
        occurrences = np.minimum(counts, max_occurrences)
        sums = scipy.sparse.csr_matrix((len(ids), self.d_sae), dtype=np.float64)
        fires = scipy.sparse.csr_matrix((len(ids), self.d_sae), dtype=np.float64)
        start = 0
        for chunk in self.csr_chunks(chunk_rows):
            rows = np.flatnonzero(kept[start : start + chunk.shape[0]])
            pick = scipy.sparse.csr_matrix((np.ones(len(rows)), (group[start + rows], rows)),
                                           shape=(len(ids), chunk.shape[0]))
            values = chunk.astype(np.float64)
            sums = sums + pick @ values
            values.data[:] = 1.0
            fires = fires + pick @ values
            start += chunk.shape[0]
        pattern = fires.tocoo()  # every (token, feature) that fired; sums may have dropped a 0.0 sum
        total = np.asarray(sums[pattern.row, pattern.col]).ravel()
        rank_order = np.lexsort((pattern.col, -total, pattern.row))  # per token: by sum, ties by feature id
        token_of = pattern.row[rank_order]
        first = np.searchsorted(token_of, np.arange(len(ids)))
        rank = np.arange(len(rank_order)) - first[token_of]
        take = rank_order[rank < k]
        at = (pattern.row[take], rank[rank < k])
        features = np.full((len(ids), k), -1, np.int64)
        mean = np.zeros((len(ids), k), np.float64)
        fraction = np.zeros((len(ids), k), np.float64)
        features[at] = pattern.col[take]
        mean[at] = total[take] / occurrences[pattern.row[take]]
        fraction[at] = pattern.data[take] / occurrences[pattern.row[take]]
        return TokenFeatureTable(token_ids=ids, occurrences=occurrences, features=features,
                                 mean_activation=mean, fire_fraction=fraction)

    # ---- bulk access ------------------------------------------------------------------------------
    def csr_chunks(self, chunk_rows: int) -> Iterator[Any]:
        """The token x feature matrix as scipy.sparse CSR chunks of `chunk_rows` rows (float32 values)."""
        import scipy.sparse

        indptr = self.file["csr/indptr"]
        for start in range(0, self.n_rows, chunk_rows):
            stop = min(start + chunk_rows, self.n_rows)
            ptr = indptr[start : stop + 1]
            a, b = int(ptr[0]), int(ptr[-1])
            yield scipy.sparse.csr_matrix(
                (self.file["csr/values"][a:b].astype(np.float32), self.file["csr/features"][a:b], ptr - a),
                shape=(stop - start, self.d_sae))

    def pool_rows(self, group: np.ndarray, n_groups: int, chunk_rows: int = 65536) -> np.ndarray:
        """Mean feature activations per group of rows: float64 [n_groups, d_sae], where row r belongs to group
        `group[r]` (-1: left out); a feature counts 0 on the rows it does not fire on. Sparse sums, chunk by chunk."""
        import scipy.sparse

        group = np.asarray(group, dtype=np.int64)
        if group.shape != (self.n_rows,):
            raise ValueError(f"group has shape {group.shape}, expected ({self.n_rows},)")
        sums = np.zeros((n_groups, self.d_sae), np.float64)
        for start, chunk in zip(range(0, self.n_rows, chunk_rows), self.csr_chunks(chunk_rows), strict=True):
            ids = group[start : start + chunk.shape[0]]
            keep = np.flatnonzero(ids >= 0)
            if len(keep):
                member = scipy.sparse.csr_matrix((np.ones(len(keep)), (ids[keep], keep)),
                                                 shape=(n_groups, chunk.shape[0]))
                sums += (member @ chunk.astype(np.float64)).toarray()
        sizes = np.bincount(group[group >= 0], minlength=n_groups)
        return sums / np.maximum(sizes, 1)[:, None]

    def check_sae(self, sae_path: str | Path) -> None:
        """Refuse an SAE other than the one this DB was built from (an export replaced after the DB was built),
        naming what changed and the command that rebuilds the DB."""
        sha256 = sae_weights_sha256(sae_path)
        if sha256 != self.attrs["sae_sha256"]:
            raise UserError(f"{self.path} is stale: built from another SAE than the one now at {sae_path} "
                            f"({'; '.join(sae_changes(self.attrs, sae_path, sha256))}); rebuild it with "
                            "`saepipe activation-db` (or `dvc repro activation_db`)")

"""The static feature browser: built from the tiny run's real summaries and activation DB, its data files
checked directly, then the page opened from disk (file://) in headless Chromium and clicked through."""

from __future__ import annotations

import json
import math
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse

from helpers import with_section
from saepipe.analysis.activation_db import ActivationDB
from saepipe.errors import UserError
from saepipe.model.tokenizer import load_tokenizer
from saepipe.paths import activation_db, analysis_dir
from saepipe.report.browser import write_browser

CHUNK = 16  # features per detail file: the tiny SAE's 128 features make 8 chunks
LIST_PAGE = 50  # rows the list shows at a time: 128 features need two "Show more" clicks
PER_TOKEN = 4
WRAPPER = re.compile(r'^SAEBrowser\.receive\("([\w-]+)",(.*)\);\n$', re.S)


def read_data(path: Path) -> tuple[str, object]:
    """(name, data) of one data script: it must be exactly one receive() call around JSON."""
    match = WRAPPER.match(path.read_text(encoding="utf-8"))
    assert match, f"{path} is not a single SAEBrowser.receive call"
    return match.group(1), json.loads(match.group(2))


def visible(piece: str) -> str:
    """How the page shows a token inline (browser.js's visible())."""
    return piece.replace("\r", "\\r").replace("\n", "↵").replace("\t", "⇥")


@pytest.fixture(scope="module")
def analysed(trained_pipeline, tmp_path_factory):
    """evaluate, activation-db, matrices and summarize run on the tiny run, into a folder of this module's own."""
    from saepipe.stages import activation_db as activation_db_stage
    from saepipe.stages import evaluate, matrices, summarize

    root = tmp_path_factory.mktemp("browser_run")
    params = with_section(trained_pipeline, "evaluate", output_dir=str(root / "analysis"))
    params = with_section(params, "matrices", top_k=5, block_size=16, chunk_rows=128, histogram_bins=20)
    params = with_section(params, "summarize", top_k=5, context_before=4, context_after=2, quantile_examples=2,
                          logit_tokens=5, neighbours=3)
    for stage in (evaluate, activation_db_stage, matrices, summarize):
        stage.run(params)
    summaries = [json.loads(line) for line in
                 (analysis_dir(params) / summarize.SUMMARIES).read_text(encoding="utf-8").splitlines()]
    return types.SimpleNamespace(params=params, summaries=summaries,
                                 path=analysis_dir(params) / summarize.SUMMARIES,
                                 tokenizer=load_tokenizer(params.base_model.output_dir))


def open_db(analysed) -> ActivationDB:
    params = analysed.params
    return ActivationDB(activation_db(params), tokens=params.tokenize.output, tokenizer=analysed.tokenizer)


def document_names(n: int) -> list[str | None]:
    """Names for the tiny corpus's documents as report.inputs.document_names gives them, every fourth unlabelled."""
    return [None if d % 4 == 3 else f"{('physics', 'biology')[d % 2]}_ch{d % 3:02d}_some-title" for d in range(n)]


@pytest.fixture(scope="module")
def built(analysed, tmp_path_factory):
    """The browser written from the run, with an auto-interpretation explanation for one feature and each
    document's chapter."""
    from saepipe.corpus.tokens import read_token_cache

    documents = document_names(read_token_cache(analysed.params.tokenize.output).n_documents)
    alive = [s for s in analysed.summaries if s["alive"]]
    explained = alive[len(alive) // 2]["id"]
    explanations = {explained: {"explanation": "Mentions of cellular energy", "detection": 0.81, "fuzzing": 0.74}}
    out = tmp_path_factory.mktemp("site") / "browser"
    run_info = {"run_name": "tiny", "model_name": "tiny-llama", "hook": "blocks.0.hook_resid_post",
                "sae_type": "batch_topk", "d_in": 64, "d_sae": len(analysed.summaries), "metrics": {"fvu": 0.25}}
    with open_db(analysed) as db:
        result = write_browser(out, summaries=analysed.path, db=db, run_info=run_info, features_per_token=PER_TOKEN,
                               explanations=explanations, documents=documents, chunk_size=CHUNK,
                               list_page=LIST_PAGE)
    return types.SimpleNamespace(out=out, result=result, explained=explained, explanations=explanations,
                                 documents=documents)


# ---- the data files, without a browser ------------------------------------------------------------------
def test_index_and_chunks_cover_every_feature_once(analysed, built) -> None:
    summaries = {s["id"]: s for s in analysed.summaries}
    name, index = read_data(built.out / "data" / "index.js")
    assert name == "index" and index["run"]["run_name"] == "tiny"
    columns = index["features"]
    assert columns["id"] == list(summaries)
    assert columns["density"] == [s["density"] for s in summaries.values()]
    assert columns["max"] == [s["max"] for s in summaries.values()]
    assert columns["alive"] == [int(s["alive"]) for s in summaries.values()]
    assert columns["top"] == [[t["token"] for t in s["top_tokens"][:5]] for s in summaries.values()]
    seen = []
    for n, chunk in enumerate(index["chunks"]):
        name, records = read_data(built.out / chunk)
        assert name == f"features-{n:04d}" and 0 < len(records) <= CHUNK
        assert all(columns["chunk"][columns["id"].index(r["id"])] == n for r in records)
        for record in records:
            expected = dict(summaries[record["id"]], **built.explanations.get(record["id"], {}))
            assert record == expected
            seen.append(record["id"])
    assert sorted(seen) == sorted(summaries) and len(seen) == len(set(seen))
    assert len(index["chunks"]) == -(-len(summaries) // CHUNK)
    table = index["documents"]  # each name once, each document pointing at its own
    assert len(table["names"]) == len(set(table["names"])) < len(built.documents)
    assert [table["names"][i] if i >= 0 else None for i in table["of"]] == built.documents


def test_files_are_scripts_css_and_html_only_and_sized(analysed, built) -> None:
    files = sorted(p for p in built.out.rglob("*") if p.is_file())
    assert {p.suffix for p in files} == {".html", ".js", ".css"}  # no pickle, no binary blobs
    assert all(not p.read_bytes().startswith(b"\x80") for p in files)
    assert built.result == {"features": len(analysed.summaries), "files": len(files),
                            "bytes": sum(p.stat().st_size for p in files)}
    index_bytes = (built.out / "data" / "index.js").stat().st_size
    assert index_bytes < 400 * len(analysed.summaries)  # the list loads every feature: it stays small
    page = (built.out / "index.html").read_text(encoding="utf-8")
    assert "<title>Feature browser: tiny</title>" in page
    assert "fetch(" not in (built.out / "assets" / "browser.js").read_text()  # file:// refuses fetch


def brute_force_token_table(db: ActivationDB, k: int, cap: int) -> dict[int, tuple[list[int], np.ndarray, int]]:
    dense = scipy.sparse.vstack(list(db.csr_chunks(1000))).toarray().astype(np.float64)
    out = {}
    for token in np.unique(db.row_token).tolist():
        rows = np.flatnonzero(db.row_token == token)[:cap]
        sums = dense[rows].sum(0)
        fires = (dense[rows] != 0).sum(0)
        best = [int(f) for f in np.argsort(-sums, kind="stable")[:k] if fires[f] > 0]
        out[token] = (best, sums[best] / len(rows), len(rows))
    return out


@pytest.mark.parametrize("cap", [3, 2000])
def test_token_feature_table_matches_a_brute_force_mean(analysed, cap) -> None:
    with open_db(analysed) as db:
        table = db.token_feature_table(PER_TOKEN, max_occurrences=cap, chunk_rows=50)
        expected = brute_force_token_table(db, PER_TOKEN, cap)
    assert table.token_ids.tolist() == sorted(expected)
    for i, token in enumerate(table.token_ids.tolist()):
        best, means, occurrences = expected[token]
        found = table.features[i] >= 0
        assert table.features[i][found].tolist() == best
        assert table.mean_activation[i][found] == pytest.approx(means, rel=1e-6)
        assert table.occurrences[i] == occurrences


def test_token_feature_table_agrees_with_search_tokens(analysed) -> None:
    """For a token whose spelling is only itself (leading space, one token), the table is search_tokens."""
    checked = 0
    with open_db(analysed) as db:
        table = db.token_feature_table(PER_TOKEN)
        for i, token in enumerate(table.token_ids.tolist()):
            piece = db.piece(token)
            if not piece.startswith(" ") or analysed.tokenizer(piece, add_special_tokens=False)["input_ids"] != [token]:
                continue
            results = db.search_tokens(piece, k=PER_TOKEN)
            found = table.features[i] >= 0
            assert table.features[i][found].tolist() == [r.feature for r in results]
            assert table.mean_activation[i][found] == pytest.approx([r.mean_activation for r in results], rel=1e-6)
            assert table.fire_fraction[i][found] == pytest.approx([r.fire_fraction for r in results])
            checked += 1
    assert checked >= 5


def test_bad_summaries_fail_with_the_line_and_leave_the_old_browser(analysed, built, tmp_path) -> None:
    out = tmp_path / "browser"
    shutil.copytree(built.out, out)
    bad = tmp_path / "bad.jsonl"
    lines = analysed.path.read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join([*lines[:40], "{not json", *lines[40:]]) + "\n", encoding="utf-8")
    with open_db(analysed) as db, pytest.raises(UserError, match=r"bad\.jsonl:41: not a JSON object"):
        write_browser(out, summaries=bad, db=db, run_info={}, features_per_token=PER_TOKEN, chunk_size=CHUNK)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "browser"]  # no temp dir left over
    assert (out / "data" / "index.js").read_bytes() == (built.out / "data" / "index.js").read_bytes()
    with open_db(analysed) as db, pytest.raises(UserError, match="run `saepipe summarize` first"):
        write_browser(tmp_path / "b2", summaries=tmp_path / "none.jsonl", db=db, run_info={}, features_per_token=1)
    assert not (tmp_path / "b2").exists()


# ---- in headless Chromium -------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver",) if Path(p).exists()), None)


@pytest.fixture(scope="module")
def driver():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Chromium and chromedriver not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield browser
    browser.quit()


class Page:
    """The browser page, with waits on the states the script sets (data-ready, data-feature, data-query)."""

    def __init__(self, driver, out: Path):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.url, self.By = driver, (out / "index.html").as_uri(), By
        self.wait = WebDriverWait(driver, 10)

    def load(self, hash_: str = "") -> None:
        self.driver.get("about:blank")
        self.driver.get(self.url + hash_)
        self.wait.until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        self.no_errors()

    def no_errors(self) -> None:
        severe = [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []

    def find(self, css: str):
        return self.driver.find_element(self.By.CSS_SELECTOR, css)

    def find_all(self, css: str):
        return self.driver.find_elements(self.By.CSS_SELECTOR, css)

    def listed(self) -> list[int]:
        return [int(x) for x in self.driver.execute_script(
            "return [...document.querySelectorAll('#feature-rows tr')].map(r => r.dataset.feature)")]

    def all_listed(self) -> list[int]:
        while self.find("#show-more").is_displayed():
            self.find("#show-more").click()
        return self.listed()

    def feature_shown(self, f: int) -> None:
        self.wait.until(lambda d: d.execute_script("return document.getElementById('feature-view').dataset.feature")
                        == str(f))
        assert self.find("#feature-heading").text == f"Feature {f}"
        self.no_errors()

    def hash(self) -> str:
        return self.driver.execute_script("return location.hash")


@pytest.fixture(scope="module")
def page(driver, built):
    return Page(driver, built.out)


def order(summaries, key, descending):
    return [s["id"] for s in sorted(summaries, key=lambda s: (-s[key] if descending else s[key], s["id"]))]


def test_list_sorts_by_density_max_and_id(page, analysed) -> None:
    page.load()
    assert len(page.listed()) == LIST_PAGE
    assert page.all_listed() == order(analysed.summaries, "density", True)  # the default: most active first
    assert page.find("th[data-key=density]").get_attribute("aria-sort") == "descending"
    page.find("#sort-density").click()
    assert page.listed() == order(analysed.summaries, "density", False)[:LIST_PAGE]  # a new order starts at the top
    page.find("#show-more").click()
    page.find("#show-more").click()
    assert page.listed() == order(analysed.summaries, "density", False)
    assert not page.find("#show-more").is_displayed()
    assert f"Showing {len(analysed.summaries)} of {len(analysed.summaries)}" in page.find("#list-status").text
    page.find("#sort-max").click()
    assert page.listed() == order(analysed.summaries, "max", True)[:LIST_PAGE]
    assert page.find("th[data-key=max]").get_attribute("aria-sort") == "descending"
    assert page.find("th[data-key=density]").get_attribute("aria-sort") is None
    page.find("#sort-id").click()
    assert page.listed() == sorted(s["id"] for s in analysed.summaries)[:LIST_PAGE]


def test_list_filters_dead_alive_and_top_token_text(page, analysed, built) -> None:
    from selenium.webdriver.support.ui import Select

    page.load()
    alive = Select(page.find("#filter-alive"))
    alive.select_by_value("dead")
    assert sorted(page.all_listed()) == sorted(s["id"] for s in analysed.summaries if not s["alive"])
    alive.select_by_value("alive")
    assert sorted(page.all_listed()) == sorted(s["id"] for s in analysed.summaries if s["alive"])
    alive.select_by_value("all")
    word = analysed.summaries[built.explained]["top_tokens"][0]["token"].strip().upper()
    page.find("#filter-text").send_keys(word)
    expected = [s["id"] for s in analysed.summaries
                if any(word.lower() in t["token"].lower() for t in s["top_tokens"][:5])]
    assert 0 < len(expected) < len(analysed.summaries)
    assert sorted(page.all_listed()) == sorted(expected)
    page.find("#filter-text").clear()
    page.find("#filter-text").send_keys("cellular energy")  # the explanation is searchable too
    assert page.listed() == [built.explained]
    assert "Showing 1 of 1" in page.find("#list-status").text


def assert_source(li, example: dict, documents: list[str | None]) -> None:
    """An example names its document's chapter (where labelled) above its document id and position."""
    from selenium.webdriver.common.by import By

    name = documents[example["doc"]]
    assert [e.text for e in li.find_elements(By.CSS_SELECTOR, ".example-document")] == ([name] if name else [])
    assert li.find_element(By.CSS_SELECTOR, ".example-position").text == \
        f"doc {example['doc']}, pos {example['position']}"
    where = li.find_element(By.CSS_SELECTOR, ".example-where").get_attribute("title")
    assert where.endswith(f"document {example['doc']}, token {example['position']}") and (name or "") in where


def test_feature_page_shows_the_summary(page, analysed, built) -> None:
    s = max(analysed.summaries, key=lambda s: (len(s["top_examples"]), s["count"]))
    page.load(f"#feature={s['id']}")
    page.feature_shown(s["id"])
    stats = page.find("#feature-view .stats").text
    assert f"{s['count']:,} tokens" in stats and "alive" in stats
    examples = page.find_all("#top-examples li.example")
    assert len(examples) == len(s["top_examples"]) > 0
    for li, example in zip(examples, s["top_examples"], strict=True):
        fired = [(el.text, float(re.match(r"activation (\S+)", el.get_attribute("title")).group(1)))
                 for el in li.find_elements(page.By.CSS_SELECTOR, ".tok.fire")]
        assert fired == [(visible(t), a) for t, a in zip(example["tokens"], example["activations"], strict=True)
                         if a > 0]
        tokens = li.find_elements(page.By.CSS_SELECTOR, ".tok")
        assert [t.text for t in tokens] == [visible(t) for t in example["tokens"]]
        marked = li.find_element(page.By.CSS_SELECTOR, "mark.marked")
        assert tokens.index(marked) == example["marked"]
        assert "this example's token" in marked.get_attribute("title")
        assert_source(li, example, built.documents)
    for q, band in s["quantile_examples"].items():
        assert len(page.driver.find_elements(
            page.By.CSS_SELECTOR, f"ol[aria-label='examples around the {q} quantile'] li.example")) == len(band)
    shares = [el.text for el in page.find_all("ol[aria-label='tokens it fires on most often'] .token-share")]
    assert shares == [f"({math.floor(t['token_share'] * 100 + 0.5)}% of its uses)" for t in s["top_tokens"]]
    promoted = [el.text for el in page.find_all("ol[aria-label='promoted tokens'] code")]
    assert promoted == [f"“{visible(t['token'])}”" for t in s["promoted_tokens"]]
    links = [int(a.get_attribute("data-feature")) for a in page.find_all("ol.nearest a")]
    assert links == [n["id"] for n in s["nearest_features"]]
    assert [int(a.get_attribute("data-feature")) for a in page.find_all("ol.cooccurring a")] == \
        [n["id"] for n in s["cooccurring_features"]]


def test_neighbour_link_changes_hash_and_back_forward_work(page, analysed) -> None:
    first_page = order(analysed.summaries, "density", True)[:LIST_PAGE]
    s = next(s for s in analysed.summaries if s["nearest_features"] and s["nearest_features"][0]["id"] in first_page)
    target = s["nearest_features"][0]["id"]
    page.load(f"#feature={s['id']}")
    page.feature_shown(s["id"])
    page.find("ol.nearest a").click()
    page.feature_shown(target)
    assert page.hash() == f"#feature={target}"
    page.driver.back()
    page.feature_shown(s["id"])
    page.driver.forward()
    page.feature_shown(target)
    page.find(".pager a[href='#list']").click()
    page.wait.until(lambda d: page.find("#list-view").is_displayed())
    focused = page.driver.switch_to.active_element  # back in the list where the reader left it
    assert focused.get_attribute("data-feature") == str(target)


def test_token_search_lists_what_search_tokens_gives(page, analysed) -> None:
    with open_db(analysed) as db:
        token = int(np.bincount(db.row_token).argmax())
        piece = next(db.piece(t) for t in np.argsort(-np.bincount(db.row_token)).tolist()
                     if db.piece(t).startswith(" ") and len(db.piece(t).strip()) > 2
                     and analysed.tokenizer(db.piece(t), add_special_tokens=False)["input_ids"] == [t])
        token = analysed.tokenizer(piece, add_special_tokens=False)["input_ids"][0]
        expected = db.search_tokens(piece, k=PER_TOKEN)
    page.load("#search")
    box = page.find("#search-input")
    box.send_keys(piece.strip() + "\n")
    page.wait.until(lambda d: d.execute_script("return document.getElementById('search-results').dataset.query")
                    == piece.strip())
    assert page.hash() == f"#search={piece.strip()}"
    result = page.find(f".token-result[data-token-id='{token}']")
    rows = result.find_elements(page.By.CSS_SELECTOR, "tbody tr")
    assert [int(r.get_attribute("data-feature")) for r in rows] == [r.feature for r in expected]
    assert [float(r.find_elements(page.By.TAG_NAME, "td")[1].text) for r in rows] == \
        pytest.approx([r.mean_activation for r in expected], rel=1e-3)
    shown = len(page.find_all(".token-result"))
    assert page.find("#search-status").text == (f"{shown} tokens match." if shown > 1 else "1 token matches.")
    rows[0].find_element(page.By.TAG_NAME, "a").click()
    page.feature_shown(expected[0].feature)
    page.load("#search=qqzzxq")
    page.wait.until(lambda d: page.find("#search-status").text)
    assert page.find("#search-status").text == "No token of the corpus matches “qqzzxq”."
    assert page.find_all(".token-result") == []


def test_deep_link_and_explanation(page, built) -> None:
    page.load(f"#feature={built.explained}")
    page.feature_shown(built.explained)
    assert page.find("#explanation").text == built.explanations[built.explained]["explanation"]
    assert page.find("#explanation-scores").text == "detection score 0.81, fuzzing score 0.74"



@pytest.mark.parametrize("asked", ["99999", "abc", "-3", "12x", ""])
def test_a_feature_link_to_no_feature_says_so_with_the_range(page, analysed, asked) -> None:
    page.load(f"#feature={asked}")
    assert not page.find("#list-view").is_displayed() and page.find("#feature-view").is_displayed()
    ids = [s["id"] for s in analysed.summaries]
    none = f"No feature {asked}" if asked else "No feature id given"
    assert page.find("#feature-heading").text == none
    assert page.find("#feature-missing").text.startswith(f"{none}: ids are {min(ids)}..{max(ids)}.")
    assert page.find("#feature-missing a[href='#list']").text == "All features"
    page.find("#feature-missing a").click()
    page.wait.until(lambda d: page.find("#list-view").is_displayed())


def test_keyboard_reaches_and_opens_a_feature(page) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    page.load()
    for _ in range(30):
        ActionChains(page.driver).send_keys(Keys.TAB).perform()
        focused = page.driver.switch_to.active_element
        if focused.tag_name == "a" and "feature-link" in (focused.get_attribute("class") or ""):
            break
    else:
        pytest.fail("Tab never reached a feature in the list")
    feature = int(focused.get_attribute("data-feature"))
    assert feature == page.listed()[0]
    focused.send_keys(Keys.ENTER)
    page.feature_shown(feature)
    assert page.driver.switch_to.active_element.get_attribute("id") == "feature-heading"


def test_screenshot_of_a_feature_page(page, analysed, tmp_path) -> None:
    s = max(analysed.summaries, key=lambda s: s["count"])
    page.load(f"#feature={s['id']}")
    page.feature_shown(s["id"])
    path = tmp_path / "browser.png"
    assert page.driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 800 and height >= 600


def test_matches_from_compare_show_on_request_with_their_splits(page, analysed, built) -> None:
    from saepipe.compare.write import write_browser_matches

    alive = [s["id"] for s in analysed.summaries if s["alive"]]
    first, second = alive[0], alive[1]
    records = [{"id": first, "match": 7, "cosine": 0.93, "correlation": 0.81, "splits": [[7, 0.93], [9, 0.64]]},
               {"id": second, "match": -1, "cosine": 0.0, "correlation": None, "splits": []}]
    page.load(f"#feature={first}")
    page.feature_shown(first)
    page.find("#load-matches").click()  # none written yet: a line saying how to make them
    page.wait.until(lambda d: "No matches yet" in page.find("#matches").text)
    missing = [e["message"] for e in page.driver.get_log("browser") if e["level"] == "SEVERE"]
    assert all("matches/index.js" in m for m in missing)  # the one file asked for and absent, nothing else
    matches = built.out.parent.parent / "matches"  # ../../matches/ from the browser, as in analysis/<run>/
    write_browser_matches(matches, "wide", "../../../wide/report/browser/index.html", {}, records)
    try:
        page.load(f"#feature={first}")
        page.feature_shown(first)
        page.find("#load-matches").click()
        page.wait.until(lambda d: page.find_all("#matches li[data-run='wide']"))
        item = page.find("#matches li[data-run='wide']")
        assert item.text.startswith("wide #7 decoder cosine 0.93, activation r 0.81")
        assert "splits into: wide #7 (0.93), wide #9 (0.64)" in item.text
        links = [a.get_attribute("href") for a in item.find_elements(page.By.CSS_SELECTOR, "a")]
        assert links[0].endswith("/wide/report/browser/index.html#feature=7") and len(links) == 3  # match + 2 splits
        page.load(f"#feature={second}")  # a fresh page asks again; once loaded, every feature shows its line
        page.feature_shown(second)
        page.find("#load-matches").click()
        page.wait.until(lambda d: "no latent left to match" in page.find("#matches").text)
        page.find(".pager a[href='#list']").click()
        page.driver.execute_script(f"location.hash = '#feature={first}'")
        page.feature_shown(first)
        page.wait.until(lambda d: page.find_all("#matches li[data-run='wide']"))
        page.no_errors()
    finally:
        shutil.rmtree(matches)

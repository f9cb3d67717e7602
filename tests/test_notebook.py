"""notebooks/explore_features.ipynb runs top to bottom, headless (nbclient), on the tiny model's run."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import with_section
from saepipe.analysis.activation_db import ActivationDB
from saepipe.corpus.tokens import read_token_cache
from saepipe.model.tokenizer import load_tokenizer
from saepipe.paths import activation_db, report_dir
from saepipe.stages import activation_db as activation_db_stage
from saepipe.stages import evaluate, interp, matrices, report, summarize

pytestmark = pytest.mark.slow
SEARCH = " the"


@pytest.fixture(scope="module")
def project(trained_pipeline, tmp_path_factory):
    """A project folder whose params.yaml (absolute paths) points at the tiny run, analysed and reported."""
    root = tmp_path_factory.mktemp("notebook")
    params = with_section(trained_pipeline, "evaluate", output_dir=str(root / "analysis"))
    params = with_section(params, "summarize", top_k=4, context_before=3, context_after=1, quantile_examples=2)
    params = with_section(params, "report", min_count=2, features_per_token=3, dpi=60)
    params = with_section(params, "process", output_dir=str(root / "processed"))  # this module's labels.json
    n = read_token_cache(params.tokenize.output).n_documents
    (root / "processed").mkdir()
    (root / "processed" / "labels.json").write_text(json.dumps([{"subject": "unknown", "chapter": "unknown"}] * n))
    for stage in (evaluate, activation_db_stage, matrices, summarize, interp, report):  # interp ranks the picks
        stage.run(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return root, params


def test_notebook_runs_headless_on_a_run(project, repo_dir, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    root, params = project
    monkeypatch.setenv("SAEPIPE_PROJECT", str(root))  # the kernel inherits the environment
    monkeypatch.setenv("SAEPIPE_SEARCH", SEARCH)
    monkeypatch.delenv("SAEPIPE_FEATURE", raising=False)
    notebook = nbformat.read(repo_dir / "notebooks" / "explore_features.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(repo_dir / "notebooks")}}).execute()

    html = [o["data"]["text/html"] for cell in notebook.cells if cell.cell_type == "code"
            for o in cell.get("outputs", []) if "text/html" in o.get("data", {})]
    picks = json.loads((report_dir(params) / "run_summary.json").read_text())["features"]
    assert picks["most_interpretable"]  # the token baseline ranked some
    pick = picks["most_interpretable"][0]
    assert html[0].startswith(f"<h4>Feature {pick}:")  # the report's pick, its examples shaded with values
    assert 'title="activation ' in html[0] and "text-decoration: underline" in html[0]
    with ActivationDB(activation_db(params), tokens=params.tokenize.output,
                      tokenizer=load_tokenizer(params.base_model.output_dir)) as db:
        best = db.search_tokens(SEARCH, k=10)[0]
        top = db.top_examples(pick, k=1, context=(16, 4))[0]
    search = html[next(i for i, h in enumerate(html) if h.startswith("<b>Features on")) + 1]
    assert search.split("<tr>")[2].startswith(f"<td>{best.feature}</td>")  # the token search's first row
    assert f"activation {top.activation:.3f}" in html[0]

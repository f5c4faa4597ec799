"""The self-contained HTML report: written by `diffmas eval --report`, checked in a real headless browser."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from diffmas.cli import app
from diffmas.eval.html_report import HTML_FILE, write_html_report

ROW = {"task": "rg:chain_sum", "accuracy": 0.5, "stderr": 0.5, "accuracy_flexible": 0.5, "stderr_flexible": 0.5,
       "n": 2, "tokens_mean": 10.0, "seconds_mean": 0.1, "perplexity": 1.5, "format_failures": 0.0}


def _agent(role, **extra):
    return {"role": role, "prompt_tokens": 40, "latent_steps": 0, "generated_tokens": 3, "seconds": 0.01, **extra}


def _sample(system, id_, correct, format_ok, agents):
    return {"system": system, "task": "rg:chain_sum", "seed": 0, "id": id_, "correct": correct,
            "flexible": correct, "truncated": False, "format_ok": format_ok, "extracted": "7" if format_ok else None,
            "detail": "", "gold": "7", "response": "Answer: 7" if correct else "<b>no</b> idea", "tokens": 3,
            "final_tokens": 3, "seconds": 0.02, "nll_sum": 1.0, "trace_tokens": 40, "agents": agents}


@pytest.fixture
def run_dir(tmp_path):
    lens = [["▁7", " seven", "\n"], [["4", 0.7], ["5", 0.2], ["x", 0.1]]]
    samples = [
        _sample("latent_mas", "a", True, True, [_agent("reasoner", latent_steps=2, latents=lens), _agent("solver")]),
        _sample("latent_mas", "b", False, True, [_agent("reasoner", latent_steps=2, latents=lens), _agent("solver")]),
        _sample("text_mas", "a", False, False, [_agent("reasoner", text="I think <script>alert(1)</script>"),
                                               _agent("solver")]),
        _sample("text_mas", "b", True, True, [_agent("reasoner", text="plan"), _agent("solver", sees="none")]),
    ]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    results = {"status": "complete", "config": {"model": "tiny", "tasks": ["rg:chain_sum"], "max_new_tokens": 8},
               "results": [{"system": "latent_mas", **ROW}, {"system": "text_mas", **ROW}], "notes": []}
    (tmp_path / "results.json").write_text(json.dumps(results))
    return tmp_path


def test_report_flag_writes_a_self_contained_page(run_dir):
    result = CliRunner().invoke(app, ["eval", "--report", str(run_dir)])
    assert result.exit_code == 0, result.output
    page = (run_dir / HTML_FILE).read_text()
    assert "data:image/png;base64," in page  # plots embedded
    assert "http://" not in page and "https://" not in page and "<link" not in page  # nothing to fetch
    assert page.count("<details class='sample") == 4
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)" in page  # text is escaped
    assert "rank 1, p = 0.700" in page  # the logit-lens heat map, with probabilities when present
    assert page.count("sees none") == 1 and page.count("sees question") == 7  # each agent's view


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_bin = shutil.which("chromedriver")
    if not browser or not driver_bin:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (scripts/setup-system.sh)")
    return webdriver, browser, driver_bin


def test_page_in_headless_chromium(run_dir, tmp_path_factory):
    webdriver, browser, driver_bin = _chrome()
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page = write_html_report(run_dir)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    except Exception as exc:  # a browser that cannot start here (no /dev/shm, ...) is an environment problem
        pytest.skip(f"chromium did not start: {str(exc).splitlines()[0]}")
    try:
        driver.get(page.resolve().as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        assert driver.find_element(By.ID, "results-table").find_elements(By.CSS_SELECTOR, "tbody tr").__len__() == 2
        rows = driver.find_elements(By.CSS_SELECTOR, "details.sample")
        assert len(rows) == 4 and all(r.is_displayed() for r in rows)
        assert all(img.get_property("naturalWidth") > 0 for img in driver.find_elements(By.CSS_SELECTOR, ".plots img"))
        wrong = driver.find_elements(By.CSS_SELECTOR, "details.sample.wrong")
        assert len(wrong) == 1
        driver.find_element(By.ID, "filter-wrong").click()
        assert not wrong[0].is_displayed()
        assert sum(r.is_displayed() for r in rows) == 3
        assert driver.find_element(By.ID, "shown-count").text == "3"
        Select(driver.find_element(By.ID, "system-filter")).select_by_value("text_mas")
        shown = [r for r in rows if r.is_displayed()]
        assert [r.get_attribute("data-system") for r in shown] == ["text_mas", "text_mas"]
        assert {r.get_attribute("data-status") for r in shown} == {"format", "correct"}
        assert [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")] == []
    finally:
        driver.quit()

"""The web page in a real browser: Debian's headless Chromium, driven by Selenium through
Debian's chromedriver, against real services on 127.0.0.1.

Two workers share one retrieval service: SmolLM2 (the shipped default LLM) writes captions, and
a nearest-neighbour worker behind an API key answers cap2mol (its answer, the best example's
molecule, is always drawable) and runs the batch job. Screenshots go to ``test-artifacts/``
(``ICMA_TEST_ARTIFACTS``; not committed).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from icma.core.corpus import write_corpus
from icma.core.settings import Settings
from icma.generation.engines import load_engine
from icma.services.retrieval.app import create_app as retrieval_app
from icma.workers.translator.app import create_app as worker_app
from tests.conftest import SERVICE_KINDS
from tests.service_helpers import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("ICMA_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[1] / "test-artifacts"))
KEY = "page-test-key"
ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
CAPTION = ("The molecule is a monocarboxylic acid that is acetic acid in which one of the methyl "
           "hydrogens is replaced by a phenyl group.")


@pytest.fixture(scope="module")
def retrieval(svc_dir):
    with LiveServer(retrieval_app(Settings(data_dir=svc_dir,
                                           retrieval_kinds=SERVICE_KINDS))) as s:
        s.wait_ready()
        yield s


def _settings(tmp: Path, retrieval_url: str, **kw) -> Settings:
    return Settings(data_dir=tmp, retrieval_url=retrieval_url, jobs_db=tmp / "jobs.sqlite3",
                    adapters_dir=tmp / "adapters", progress=False, shipped_adapters_dir=None,
                    **kw)


@pytest.fixture(scope="module")
def smol(retrieval, smollm2, tmp_path_factory):
    settings = _settings(tmp_path_factory.mktemp("page-smol"), retrieval.url)
    engine = load_engine("transformers", settings=settings, model=str(smollm2), device="cpu")
    with LiveServer(worker_app(settings, engine_loader=lambda: engine)) as w:
        w.wait_ready()
        yield w


@pytest.fixture(scope="module")
def keyed(retrieval, tiny_learner, chebi_val, tmp_path_factory):
    """Nearest neighbour behind a key; its tune jobs tune the tiny config-built model on 32
    pairs of a corpus in its data directory."""
    tmp = tmp_path_factory.mktemp("page-nn")
    (tmp / "corpora").mkdir()
    write_corpus(chebi_val.subset(range(32), name="train32"), tmp / "corpora" / "train32.tsv")
    settings = _settings(tmp, retrieval.url, engine="nearest-neighbour", api_key=KEY,
                         models_dir=tiny_learner.parent)
    with LiveServer(worker_app(settings)) as w:
        w.wait_ready()
        yield w


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("Debian's chromium and chromium-driver are needed (make test installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--lang=en-US"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def shot(driver, name: str) -> Path:
    path = ARTIFACTS / f"page-{name}.png"
    driver.save_screenshot(str(path))
    return path


def wait(driver, what, timeout: float = 120, message: str = ""):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(what)
    except TimeoutException:
        shot(driver, "timeout")
        logs = [e["message"] for e in driver.get_log("browser")]
        raise AssertionError(f"{message or what} did not happen; browser log: {logs}") from None


def view(driver, name: str):
    return driver.find_element(By.ID, f"view-{name}")


def by_testid(root, name: str):
    return root.find_element(By.CSS_SELECTOR, f'[data-testid="{name}"]')


def open_page(driver, server, tab: str, key: str | None = None) -> None:
    driver.get_log("browser")  # drained: what an earlier test provoked is not this page's
    driver.get("about:blank")  # a fresh page (another hash alone would not reload it)
    driver.get(f"{server.url}/#{tab}")
    wait(driver, lambda d: d.execute_script("return document.readyState") == "complete")
    if key is not None:
        dialog = driver.find_element(By.ID, "key-dialog")
        if driver.execute_script("return sessionStorage.getItem('icma-api-key')") == key:
            assert dialog.get_attribute("open") is None  # kept for the tab: not asked again
            return
        assert dialog.get_attribute("open") is not None, "the page did not ask for the API key"
        field = by_testid(dialog, "key-input")
        field.send_keys(key)
        by_testid(dialog, "key-save").click()
        wait(driver, lambda d: dialog.get_attribute("open") is None)


def no_page_errors(driver) -> None:
    """No script error and no refused call (a 4xx or 5xx the page provoked by itself)."""
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
              and "favicon" not in e["message"]]
    assert not severe, severe


def test_molecule_to_caption_with_example_cards(browser, smol):
    open_page(browser, smol, "mol2cap")
    v = view(browser, "mol2cap")
    box = by_testid(v, "smiles-input")
    box.send_keys(ASPIRIN)
    by_testid(v, "translate-button").click()
    caption = by_testid(v, "caption-output")
    wait(browser, lambda d: caption.text.strip(), message="a caption")
    cards = v.find_elements(By.CSS_SELECTOR, '[data-testid="example-card"]')
    assert len(cards) == 2  # ICMA's mol2cap examples
    # Each card: rank, CID, score, the example's caption, and its drawing with the atoms it
    # shares with the query counted (aspirin shares its benzene ring at least).
    wait(browser, lambda d: all(c.find_elements(By.CSS_SELECTOR, "figure img") for c in cards),
         message="the examples drawn")
    wait(browser, lambda d: all("shares" in c.find_element(By.CSS_SELECTOR, ".shared").text
                                for c in cards), message="shared atoms counted")
    first = cards[0].text
    assert "#1" in first and "CID" in first and "score" in first
    shared = int(cards[0].find_element(By.CSS_SELECTOR, ".shared").text.split()[1])
    assert 6 <= shared <= 13
    meta = by_testid(v, "meta").text
    assert "transformers" in meta and "retrieval" in meta and "total" in meta
    wait(browser, lambda d: v.find_elements(By.CSS_SELECTOR, ".query-drawing img"),
         message="the query drawn")
    assert by_testid(v, "error").is_displayed() is False
    shot(browser, "mol2cap")
    no_page_errors(browser)
    # A next query that fails leaves no answer behind to be read as its own.
    box.clear()
    box.send_keys("C1CC(", Keys.ENTER)
    wait(browser, lambda d: by_testid(v, "error").is_displayed(), message="the error shown")
    assert not caption.is_displayed()
    assert not v.find_elements(By.CSS_SELECTOR, '[data-testid="example-card"]')


def test_invalid_smiles_is_named_next_to_the_input(browser, smol):
    open_page(browser, smol, "mol2cap")
    v = view(browser, "mol2cap")
    box = by_testid(v, "smiles-input")
    box.clear()
    box.send_keys("C1CC(", Keys.ENTER)  # Enter submits, as the button does
    error = by_testid(v, "error")
    wait(browser, lambda d: error.is_displayed(), message="the error shown")
    assert "smiles" in error.text and "not a valid SMILES" in error.text
    assert box.get_attribute("aria-invalid") == "true"
    shot(browser, "invalid-smiles")


def test_caption_to_molecule_draws_the_answer_behind_an_api_key(browser, keyed):
    open_page(browser, keyed, "cap2mol", key=KEY)
    v = view(browser, "cap2mol")
    assert v.is_displayed() and not view(browser, "mol2cap").is_displayed()
    by_testid(v, "caption-input").send_keys(CAPTION)
    by_testid(v, "translate-button").click()
    validity = by_testid(v, "validity")
    wait(browser, lambda d: validity.text.strip(), message="validity")
    assert validity.text == "valid molecule"
    smiles = by_testid(v, "smiles-output").text
    assert smiles and by_testid(v, "canonical-output").text not in ("", "—")
    wait(browser, lambda d: v.find_elements(By.CSS_SELECTOR,
                                            '[data-testid="structure-output"] img'),
         message="the answer drawn")
    cards = v.find_elements(By.CSS_SELECTOR, '[data-testid="example-card"]')
    assert len(cards) == 4  # ICMA's cap2mol examples
    # The nearest-neighbour answer is the first example's molecule: it shares all its atoms.
    wait(browser, lambda d: "shares" in cards[0].find_element(By.CSS_SELECTOR, ".shared").text)
    words = cards[0].find_element(By.CSS_SELECTOR, ".shared").text.split()
    assert words[1] == words[4], words
    shot(browser, "cap2mol")
    no_page_errors(browser)


def test_batch_upload_reaches_100_percent_and_downloads_one_line_per_input(
        browser, keyed, downloads, chebi_val, tmp_path):
    rows = chebi_val[:3]
    upload = tmp_path / "three.jsonl"
    upload.write_text("".join(json.dumps({"input": r.smiles, "id": r.cid,
                                          "reference": r.description}) + "\n" for r in rows))
    open_page(browser, keyed, "batch", key=KEY)
    v = view(browser, "batch")
    by_testid(v, "job-file").send_keys(str(upload))
    by_testid(v, "job-submit").click()
    status = by_testid(v, "job-status")
    wait(browser, lambda d: status.text.startswith("succeeded"), message="the job finishing")
    assert by_testid(v, "job-progress").get_attribute("value") == "100"
    assert "3 of 3 done" in status.text
    metrics = by_testid(v, "job-metrics")
    wait(browser, lambda d: metrics.is_displayed(), message="the metrics panel")
    assert "bleu4" in metrics.text and "3 of 3" in metrics.text
    by_testid(v, "download-jsonl").click()
    got = _downloaded(downloads, ".jsonl")
    lines = [json.loads(x) for x in got.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r.cid for r in rows]
    by_testid(v, "download-csv").click()
    csv = _downloaded(downloads, ".csv").read_text().splitlines()
    assert len(csv) == 1 + len(rows) and csv[0].startswith("index,id,input,reference")
    shot(browser, "batch")
    no_page_errors(browser)


def _downloaded(folder: Path, suffix: str, timeout: float = 30) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done = [p for p in folder.iterdir() if p.suffix == suffix]
        if done:
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no {suffix} download in {sorted(folder.iterdir())}")


def test_models_view_follows_a_tune_job_to_its_adapter(browser, keyed, tiny_learner):
    open_page(browser, keyed, "models", key=KEY)
    v = view(browser, "models")
    wait(browser, lambda d: v.find_elements(By.CSS_SELECTOR, ".adapters p, .adapters article"))
    assert "No adapters yet" in by_testid(v, "adapters").text
    assert "No tuning runs" in by_testid(v, "tune-jobs").text
    r = httpx.post(keyed.url + "/v1/jobs", headers={"Authorization": f"Bearer {KEY}"},
                   timeout=30, json={"kind": "tune", "task": "mol2cap", "options": {
                       "name": "page-icmt", "base_model": tiny_learner.name, "train": "train32",
                       "retrieval": "morgan", "n_shot": 2, "cutoff": 512, "lora_r": 8,
                       "lora_alpha": 16, "learning_rate": 2e-2, "warmup_steps": 0,
                       "max_steps": 12, "batch_size": 8, "grad_accum": 1, "log_steps": 1}})
    assert r.status_code == 202, r.text
    browser.find_element(By.ID, "tab-models").click()  # refreshes the view
    # The page polls while the job runs: its card, progress and loss curve fill in.
    wait(browser, lambda d: "succeeded" in by_testid(v, "tune-jobs").text, timeout=300,
         message="the tune job finishing on the page")
    card = by_testid(v, "tune-card")
    assert card.find_element(By.TAG_NAME, "progress").get_attribute("value") == "100"
    line = card.find_element(By.CSS_SELECTOR, '[data-testid="loss-curve"] polyline')
    assert len(line.get_attribute("points").split()) == 12  # one point per logged step
    assert "training loss from" in by_testid(card, "loss-curve").get_attribute("aria-label")
    names = [c.find_element(By.TAG_NAME, "strong").text
             for c in v.find_elements(By.CSS_SELECTOR, '[data-testid="adapter-card"]')]
    assert names == ["page-icmt"]
    shot(browser, "models")
    no_page_errors(browser)


def test_page_is_usable_at_phone_width(browser, smol):
    browser.set_window_size(390, 844)
    try:
        open_page(browser, smol, "mol2cap")
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways at phone width ({width} px)"
        v = view(browser, "mol2cap")
        assert by_testid(v, "translate-button").is_displayed()
        shot(browser, "phone")
    finally:
        browser.set_window_size(1280, 1000)


def test_page_headers_and_no_key_for_the_page_itself(keyed):
    page = httpx.get(keyed.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    config = page.text.split('id="icma-config">')[1].split("</script>")[0]
    assert json.loads(config)["key_required"] is True
    assert httpx.get(keyed.url + "/page/page.js").status_code == 200
    assert httpx.get(keyed.url + "/page/nope.js").status_code == 404
    assert httpx.get(keyed.url + "/page/..%2Fapp.py").status_code == 404
    # The API behind the page still needs the key.
    assert httpx.post(keyed.url + "/v1/depict", json={"smiles": "CCO"}).status_code == 401

"""`icma download` against a real HTTP server on 127.0.0.1 serving the reference files."""

import json
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from icma.cli import main
from icma.evaluation.download import DownloadError, download


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def mirror(tmp_path, shared):
    root = tmp_path / "www"
    chebi = root / "ChEBI-20_data"
    chebi.mkdir(parents=True)
    for split in ("validation.txt", "test.txt"):
        shutil.copy(shared / "data/chebi20" / split, chebi / split)
    # The real train split is not available offline; the captioned subset stands in for it.
    shutil.copy(shared / "data/chebi20/partial/train_PARTIAL_subset_from_ChemLLMBench_prompts.txt",
                chebi / "train.txt")
    iupac = root / "data/PubChem324k/iupac/raw"
    iupac.mkdir(parents=True)
    for split in ("train.txt", "validation.txt", "test.txt"):
        shutil.copy(shared / "data/pubchem324k-iupac" / split, iupac / split)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_chebi20_download_verifies(mirror, tmp_path):
    root, url = mirror
    out = tmp_path / "chebi"
    record = download("chebi20", out, base_url=url, log=lambda m: None)
    assert (out / "validation.txt").read_bytes() == (root / "ChEBI-20_data/validation.txt").read_bytes()
    assert record["files"]["validation.txt"]["verified"] == "sha256"
    assert record["files"]["train.txt"]["verified"] == "format"
    assert "26407" in record["files"]["train.txt"]["note"]  # the stand-in is flagged as short
    assert json.loads((out / "SOURCES.json").read_text())["dataset"] == "chebi20"
    assert "CC BY 4.0" in (out / "ATTRIBUTION.md").read_text()


def test_iupac_download_all_pinned(mirror, tmp_path):
    _, url = mirror
    record = download("pubchem324k-iupac", tmp_path / "iupac", base_url=url, log=lambda m: None)
    assert {f["verified"] for f in record["files"].values()} == {"sha256"}
    assert record["files"]["train.txt"]["rows"] == 11856


def test_tampered_file_is_refused_and_nothing_is_left(mirror, tmp_path):
    root, url = mirror
    path = root / "ChEBI-20_data/test.txt"
    path.write_text(path.read_text().replace("The molecule", "A molecule", 1))
    out = tmp_path / "chebi"
    with pytest.raises(DownloadError, match="sha256"):
        download("chebi20", out, base_url=url, log=lambda m: None)
    assert not out.exists()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_missing_file_and_dead_server(mirror, tmp_path):
    root, url = mirror
    (root / "ChEBI-20_data/train.txt").unlink()
    with pytest.raises(DownloadError, match="HTTP 404"):
        download("chebi20", tmp_path / "a", base_url=url, log=lambda m: None)
    with pytest.raises(DownloadError, match="cannot connect"):
        download("chebi20", tmp_path / "b", base_url="http://127.0.0.1:9/", timeout=5,
                 log=lambda m: None)


def test_cli_download(mirror, tmp_path, capsys):
    _, url = mirror
    assert main(["download", "pubchem324k-iupac", "--to", str(tmp_path / "d"), "--base-url", url]) == 0
    assert (tmp_path / "d/test.txt").exists()
    assert main(["download", "chembl", "--to", str(tmp_path / "x")]) == 2
    assert "unknown dataset 'chembl'" in capsys.readouterr().err

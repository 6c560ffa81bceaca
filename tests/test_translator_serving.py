"""The translation worker's serving class without HTTP: real local indexes, the real job store
and runner, the nearest-neighbour engine (no model, so answers are known in advance)."""

from __future__ import annotations

import json
import time

import anyio
import pytest

from icma.core.errors import ConflictError, IcmaError, InputError, NotFoundError
from icma.core.settings import Settings
from icma.generation.engines import load_engine
from icma.generation.retrievers import LocalRetriever
from icma.workers.translator.protocol import Cap2MolRequest, JobCreate, Mol2CapRequest
from icma.workers.translator.serving import TranslatorService
from tests.conftest import SERVICE_KINDS

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


@pytest.fixture(scope="module")
def service(svc_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("translator")
    settings = Settings(data_dir=svc_dir, jobs_db=tmp / "jobs.sqlite3",
                        adapters_dir=tmp / "adapters", progress=False, max_k=8,
                        engine="nearest-neighbour", shipped_adapters_dir=None)
    svc = TranslatorService(settings, LocalRetriever(settings, SERVICE_KINDS),
                            engine_loader=lambda: load_engine("nearest-neighbour", settings=settings))
    svc.start()
    deadline = time.monotonic() + 60
    while svc.state() != "ready":
        assert time.monotonic() < deadline, svc.state()
        time.sleep(0.05)
    yield svc
    svc.stop()


def test_mol2cap_answers_with_the_best_examples_caption(service):
    out = service.mol2cap(Mol2CapRequest(smiles=ASPIRIN, return_prompt=True))
    assert out.engine == "nearest-neighbour" and out.adapter is None
    assert len(out.examples) == 2 and [e.rank for e in out.examples] == [1, 2]
    assert out.caption == out.examples[0].description
    assert out.prime_answer is True and out.prompt.endswith("Caption:")
    assert out.timings.total_ms >= out.timings.retrieval_ms


def test_cap2mol_checks_the_molecule(service):
    out = service.cap2mol(Cap2MolRequest(caption="The molecule is an alpha-amino acid.",
                                         n_shot=3))
    assert len(out.examples) == 3
    assert out.smiles == out.examples[0].smiles and out.valid and out.canonical_smiles


@pytest.mark.parametrize("request_, error, status, field", [
    (Mol2CapRequest(smiles=ASPIRIN, adapter="nope"), NotFoundError, 404, "adapter"),
    (Mol2CapRequest(smiles=ASPIRIN, retrieval={"method": "bm25"}), InputError, 422,
     "retrieval.method"),
    (Mol2CapRequest(smiles=ASPIRIN, n_shot=9), InputError, 422, "n_shot"),
    (Mol2CapRequest(smiles="C1CC"), InputError, 422, "smiles"),
    (Cap2MolRequest(caption="an acid", num_candidates=3, generation={"decoding": "greedy"}),
     InputError, 422, "num_candidates"),
])
def test_bad_requests_raise_errors_that_know_their_status(service, request_, error, status,
                                                          field):
    call = service.mol2cap if isinstance(request_, Mol2CapRequest) else service.cap2mol
    with pytest.raises(error) as e:
        call(request_)
    assert isinstance(e.value, IcmaError)
    assert (e.value.status, e.value.field) == (status, field)


def test_a_job_runs_to_its_result_lines(service):
    job = service.create_job(JobCreate(task="mol2cap", items=[ASPIRIN, "C1CC", "CCO"]))
    assert job.state == "queued" and job.total == 3
    deadline = time.monotonic() + 60
    while service.get_job(job.id).state != "succeeded":
        assert time.monotonic() < deadline, service.get_job(job.id)
        time.sleep(0.05)
    done = service.get_job(job.id)
    assert (done.done, done.failed) == (3, 1)
    stream = service.job_results(job.id, follow=False)
    assert service.followers.open == 1

    async def read():
        return [json.loads(x) async for x in stream]

    lines = anyio.run(read)
    stream.close()
    assert service.followers.open == 0
    assert [x["index"] for x in lines] == [0, 1, 2]
    assert lines[1]["error"]["field"] == "smiles" and lines[1]["prediction"] == ""
    assert lines[0]["prediction"] and lines[0]["error"] is None
    assert job.id in [j.id for j in service.list_jobs(None, 10).jobs]
    with pytest.raises(ConflictError):
        service.cancel_job(job.id)  # finished already


def test_job_input_is_checked_before_it_is_queued(service):
    with pytest.raises(InputError) as e:
        service.upload_job("mol2cap", "in.jsonl", b'"CCO"\n', '{"n_shot": "two"}')
    assert e.value.field == "options.n_shot"  # (the field itself, as a JSON job says it)
    with pytest.raises(InputError) as e:
        service.upload_job("smiles2text", "in.jsonl", b'"CCO"\n', "{}")
    assert e.value.field == "task"
    with pytest.raises(NotFoundError):
        service.get_job("no-such-job")
    assert service.adapters().adapters == []

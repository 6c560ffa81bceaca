"""The Dockerfiles, checked as far as a machine without a Docker engine allows."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def instructions(path: Path) -> list[tuple[str, str]]:
    text = path.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_retrieval_image():
    ins = instructions(REPO / "docker/retrieval.Dockerfile")
    words = [w for w, _ in ins]
    assert words[0] == "FROM" and "python:3.11" in ins[0][1]
    # every COPY source exists in the repository
    for word, rest in ins:
        if word == "COPY":
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), src
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "torch==2.13.0" in runs and "download.pytorch.org/whl/cpu" in runs
    user = [rest for word, rest in ins if word == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    assert any(w == "HEALTHCHECK" and "/healthz" in r for w, r in ins)
    assert ("EXPOSE", "8001") in ins
    cmd = [r for w, r in ins if w == "CMD"][-1]
    assert '"icma", "serve", "retrieval"' in cmd and '"0.0.0.0"' in cmd
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored

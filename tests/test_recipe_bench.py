"""The ICMT recipe benchmark's bookkeeping (``benchmarks/bench_icmt_recipe.py``): which
checkpoints become curve points, what its report says about decoding time, and how the
decodings of a checkpoint are counted and tabled. Its arms take
hours; these are the parts that decide what is scored and reported, checked on small files."""

from __future__ import annotations

import json

from benchmarks.bench_icmt_recipe import decode_times, decoding_table, to_score, winners


def _ckpt(root, step, total=40):
    folder = root / f"step-{step:07d}"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"step": step, "total_steps": total}))
    return folder


def test_interrupted_checkpoints_resume_but_are_not_scored(tmp_path):
    ckpts = [_ckpt(tmp_path, s) for s in (20, 27, 40)]
    assert [c.name for c in to_score(ckpts, 20, set())] == ["step-0000020", "step-0000040"]
    assert [c.name for c in to_score(ckpts, 20, {20})] == ["step-0000040"]
    # A run whose last step is not a multiple of --every still gets its last point.
    (tmp_path / "odd").mkdir()
    odd = [_ckpt(tmp_path / "odd", s, total=33) for s in (20, 33)]
    assert [c.name for c in to_score(odd, 20, set())] == ["step-0000020", "step-0000033"]


def test_decode_times_by_machine_precision_and_speculation():
    res = {"arms": {
        "icma-s40": {"options": {"precision": "bfloat16"}, "machine": "Xeon",
                     "curve": [{"step": 20}, {"step": 40}]},
        "icma-s40-fp32": {"options": {"precision": "float32"}, "machine": "EPYC",
                          "curve": [{"step": 20, "wall_s": 1020.0, "speculative_tokens": 0},
                                    {"step": 40, "wall_s": 1140.0, "speculative_tokens": 0}]},
        "morgan-s40-fp32": {"options": {"precision": "float32"}, "machine": "EPYC",
                            "curve": [{"step": 20, "wall_s": 420.0,
                                       "speculative_tokens": 16}]}}}
    text = decode_times(res, 100)
    assert "18 minutes in float32 without speculation on EPYC (median of 2)" in text
    assert "7 minutes in float32 with speculation on EPYC (median of 1)" in text
    assert "Points without a recorded time" in text
    del res["arms"]["icma-s40"]
    assert "Points without a recorded time" not in decode_times(res, 100)


def test_consensus_winners_are_counted_by_source(tmp_path):
    lines = [{"consensus": {"source": "sample", "rank": None}},
             {"consensus": {"source": "example", "rank": 1}},
             {"consensus": {"source": "example", "rank": 2}},
             {"consensus": {"source": "sample", "rank": None}}]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert winners(path) == {"winners": {"sample": 2, "top_example": 1, "other_example": 1}}
    path.write_text(json.dumps({"prediction": "greedy has no pool"}) + "\n")
    assert winners(path) == {}


def test_decoding_table_rows_beside_the_nearest_neighbour():
    m = {"bleu2": 0.4, "bleu4": 0.3, "rouge1": 0.5, "rouge2": 0.3, "rougeL": 0.45, "meteor": 0.42}
    res = {"nearest_neighbour": {"metrics": {**m, "bleu4": 0.36}}, "decodings": {
        "icma-s40-fp32": {"step": 40, "rows": {
            "greedy": {"metrics": m, "wall_s": 600.0},
            "consensus-8": {"metrics": {**m, "bleu4": 0.39}, "wall_s": 1200.0,
                            "winners": {"sample": 60, "top_example": 30, "other_example": 10}}}}}}
    res["nearest_neighbour_other"] = {"morgan": {"method": "morgan", "metrics": m}}
    rows = [r for r in decoding_table("mol2cap", res) if r.startswith("| ")][2:]
    assert rows[0].startswith("| nearest neighbour |") and "| 0.410 |" in rows[0]
    assert rows[1].startswith("| nearest neighbour (morgan) |") and "| 0.390 |" in rows[1]
    assert rows[2].startswith("| icma-s40-fp32 | 40 | greedy |") and "| 10 |" in rows[2]
    assert "| 0.390 |" in rows[3] and rows[3].endswith("| 20 | 60 / 30 / 10 |")
    assert decoding_table("mol2cap", {"arms": {}}) == []

"""bench/report.py's plotting helpers: the Pareto frontier, sideways dodging of markers that share
a ratio, greedy label placement, and the two plots rendered from small made-up results."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)
pareto_front = report.pareto_front


def test_pareto_front_minimising_x_drops_dominated_points_and_sorts_by_x():
    points = [(300, 1.07, "dense int4"), (90, 1.63, "small"), (105, 1.48, "vocab-32k"),
              (120, 1.60, "dominated by vocab-32k"), (1100, 1.04, "fp32"), (1200, 1.04, "same y, bigger file"),
              (300, 1.10, "same x, worse y"), (2000, 2.0, "worst")]
    assert pareto_front(points, minimise_x=True) == ["small", "vocab-32k", "dense int4", "fp32"]


def test_pareto_front_maximising_x():
    points = [(90, 1.03, "slow best"), (183, 1.0366, "fast good"), (170, 1.21, "dominated"),
              (269, 1.63, "fastest"), (252, 1.14, "vocab-64k"), (252, 1.20, "same x, worse y")]
    assert pareto_front(points, minimise_x=False) == ["slow best", "fast good", "vocab-64k", "fastest"]
    # The same points with x minimised make a different frontier: the direction matters.
    assert pareto_front(points, minimise_x=True) == ["slow best"]


def test_pareto_front_keeps_exact_ties_and_handles_small_inputs():
    assert pareto_front([], minimise_x=True) == []
    assert pareto_front([(1.0, 2.0, "only")], minimise_x=False) == ["only"]
    tied = [(0.2, 40.0, "a"), (0.2, 40.0, "b"), (0.2, 50.0, "c"), (0.3, 52.0, "d")]
    assert pareto_front(tied, minimise_x=False) == ["a", "b", "d"]
    assert pareto_front(tied, minimise_x=True) == ["a", "b"]


@pytest.mark.parametrize("minimise_x", [True, False])
def test_pareto_front_matches_its_definition_on_random_points(minimise_x):
    rng = random.Random(0)
    sign = 1 if minimise_x else -1
    for _ in range(50):
        points = [(rng.randint(0, 5), rng.randint(0, 5), i) for i in range(rng.randint(1, 12))]

        def dominated(p, points=points):
            return any(sign * q[0] <= sign * p[0] and q[1] <= p[1] and (q[0], q[1]) != (p[0], p[1]) for q in points)

        front = pareto_front(points, minimise_x)
        assert sorted(front) == [p[2] for p in points if not dominated(p)]
        xs = [points[k][0] for k in front]
        assert xs == sorted(xs)


def test_dodge_keeps_frontier_and_lone_markers_on_their_true_x():
    single = [(0.2, ("wanda-sp", 0.2)), (0.2, ("taylor", 0.2)), (0.2, ("random", 0.2)), (0.5, ("alone", 0.5))]
    # A line has a point at 0.2, so 0.2's markers move aside; none shares an offset.
    out = report.dodge(single, taken={0.2, 0.3}, front=set())
    assert out[("alone", 0.5)] == 0.0
    at = [out[k] for _, k in single[:3]]
    assert 0.0 not in at and len(set(at)) == 3
    # A frontier marker keeps its true x even where a line has a point.
    out = report.dodge(single, taken={0.2}, front={("taylor", 0.2)})
    assert out[("taylor", 0.2)] == 0.0
    assert sorted(out[k] for _, k in single[:3] if k != ("taylor", 0.2)) == [-8.0, 8.0]


def test_place_labels_puts_crowded_labels_apart_and_inside_the_axes():
    anchors = [(100.0, 100.0), (104.0, 102.0), (108.0, 98.0), (370.0, 40.0)]
    sizes = [(60.0, 10.0)] * len(anchors)
    obstacles = [(ax - 5, ay - 5, ax + 5, ay + 5) for ax, ay in anchors]
    bounds = (0.0, 0.0, 400.0, 200.0)
    corners = report.place_labels(anchors, sizes, obstacles, bounds)
    boxes = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes)]
    for i, a in enumerate(boxes):
        assert bounds[0] <= a[0] and a[2] <= bounds[2] and bounds[1] <= a[1] and a[3] <= bounds[3]
        assert all(report._overlap(a, o) == 0 for o in obstacles)
        assert all(report._overlap(a, b) == 0 for b in boxes[i + 1:])
    # The label near the right edge goes to the left of its point rather than out of the axes.
    assert boxes[3][2] <= anchors[3][0]
    assert report.place_labels(anchors, sizes, obstacles, bounds) == corners  # deterministic


def _compress_runs(ratios) -> dict:
    runs = {"dense": {"ratio": 0.0, "perplexity": {"wikitext2": 24.0, "pydocs": 14.0}}}
    for i, r in enumerate(ratios):
        runs[f"comp@{r}"] = {"method": "comp", "ratio": r, "perplexity": {"wikitext2": 30 * 1.4**i, "pydocs": 20 * 1.4**i}}
    for m, ppl in (("wanda-sp", 50.0), ("magnitude", 8e5), ("taylor", 68.0)):
        runs[f"{m}@0.2"] = {"method": m, "ratio": 0.2, "perplexity": {"wikitext2": ppl, "pydocs": ppl}}
    runs["comp[fit=scales]@0.2"] = {"method": "comp", "ratio": 0.2, "perplexity": {"wikitext2": 44.0, "pydocs": 33.0}}
    runs["random@0.2"] = {"method": "random", "ratio": 0.2, "error": "failed"}
    return runs


@pytest.mark.parametrize("ratios", [[0.2], [0.2, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5]])
def test_plot_compress_renders_any_number_of_ratios(tmp_path, ratios):
    pytest.importorskip("matplotlib")
    out = report._plot_compress(_compress_runs(ratios), tmp_path / "img" / "compress_ppl.png")
    assert out is not None and out.stat().st_size > 10_000
    assert report._compress_series(_compress_runs(ratios))["comp"] == [
        (r, {"wikitext2": 30 * 1.4**i, "pydocs": 20 * 1.4**i}) for i, r in enumerate(ratios)]


def test_plot_deploy_renders(tmp_path):
    pytest.importorskip("matplotlib")
    rows = {}
    for a, (size, speed, bpb) in {"dense": (300e6, 188, 1.07), "vocab-32k": (105e6, 235, 1.48),
                                  "decoder-0.2": (285e6, 200, 1.24)}.items():
        for p, f in (("fp32", 3.6), ("int8", 1.1), ("int4", 1.0)):
            rows[f"{a}:{p}"] = {"artifact": a, "precision": p, "file_bytes": size * f, "decode_bytes_per_s": speed / f,
                                "bits_per_byte": {"wikitext2": bpb * (1.0 if p == "int4" else 0.97)}, "error": None}
    rows["broken:int4"] = {"artifact": "broken", "precision": "int4", "error": "export failed"}
    out = report._plot_deploy(rows, tmp_path / "deploy.png")
    assert out is not None and out.stat().st_size > 10_000


@pytest.mark.parametrize("name", ["compress", "deploy"])
def test_the_recorded_results_render(tmp_path, name):
    """The checked-in results still render (into a scratch docs folder, not docs/)."""
    pytest.importorskip("matplotlib")
    results = json.loads((REPO / "bench" / "results" / f"{name}.json").read_text())
    getattr(report, f"render_{name}")(results, tmp_path)
    assert (tmp_path / "img" / ("compress_ppl.png" if name == "compress" else "deploy.png")).is_file()
    assert f"<!-- {name}:begin -->" in (tmp_path / "benchmarks.md").read_text()


def test_the_recorded_gguf_results_render(tmp_path):
    """bench/side_by_side.py's results render: every measured row, the artifacts as compressed, the targets."""
    results = json.loads((REPO / "bench" / "results" / "gguf.json").read_text())
    report.render_gguf(results, tmp_path)
    text = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- gguf:begin -->" in text and "| vocab-64k | llama.cpp |" in text and "| dense | llama.cpp |" in text
    assert text.count("| onnx-int4 |") == sum(k.endswith(":onnx-int4") and k.startswith("measure:") for k in results["steps"])
    assert "18 layers of MLP width 1280" in text and "✅ met" in text

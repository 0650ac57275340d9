"""edgecli.report's bench outputs as a user reads them: the Pareto plot's labels."""

from __future__ import annotations

import itertools

from edgecli.report import plot_pareto


def _label_boxes(fig):
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    anns = [t for t in ax.texts if hasattr(t, "xyann")]
    return anns, [a.get_window_extent(renderer) for a in anns]


def test_pareto_labels_of_near_identical_points_do_not_overlap(tmp_path):
    # compress's quantized copy that did not change, and the same model given by path: one spot on the plot
    pts = [
        {"label": "pytorch", "kind": "torch", "p50_ms": 0.080, "accuracy": 0.950, "size_bytes": 40_000},
        {"label": "train", "kind": "onnx", "p50_ms": 0.0120, "accuracy": 0.9500, "size_bytes": 38_000},
        {"label": "/elsewhere/model.onnx", "kind": "onnx", "p50_ms": 0.01201, "accuracy": 0.9500, "size_bytes": 38_000},
        {"label": "export", "kind": "onnx", "p50_ms": 0.0121, "accuracy": 0.9499, "size_bytes": 37_000},
    ]
    out = tmp_path / "pareto.png"
    fig = plot_pareto(pts, out, "t")
    assert out.stat().st_size > 0
    anns, boxes = _label_boxes(fig)
    assert sorted(a.get_text().split("\n")[0] for a in anns) == sorted(p["label"] for p in pts)
    ax = fig.axes[0]
    anchors = {a.get_text().split("\n")[0]: ax.transData.transform(a.xy) for a in anns}
    # the three ONNX points sit within a pixel or two of each other: their labels started on one spot
    assert abs(anchors["train"] - anchors["/elsewhere/model.onnx"]).max() < 3
    for (a, ba), (b, bb) in itertools.combinations(zip(anns, boxes, strict=True), 2):
        assert not ba.overlaps(bb), f"labels overlap: {a.get_text()!r} and {b.get_text()!r}"


def test_pareto_label_of_a_lone_point_stays_beside_it(tmp_path):
    pts = [{"label": "train", "kind": "onnx", "p50_ms": 0.012, "accuracy": 0.95, "size_bytes": 38_000},
           {"label": "pytorch", "kind": "torch", "p50_ms": 0.5, "accuracy": 0.90, "size_bytes": 40_000}]
    anns, _ = _label_boxes(plot_pareto(pts, tmp_path / "p.png", "t"))
    assert [a.xyann for a in anns] == [(8, 8), (8, 8)]  # nothing to avoid: the usual offset


def test_a_long_reason_in_the_last_column_wraps_and_leaves_the_figures_whole(capsys):
    """export's auto table in a 200-column log: a long 'not built: ...' verdict used to cut every other
    column down to an ellipsis (candidate names and p50s unreadable)."""
    from edgecli.report import render_table

    why = "not built: runtime openvino: installed but does not import (ImportError); " * 3
    rows = [["openvino:int8-weights+bf16", 0.123456, "1.00x", "12.3 KB", "acc 0.9844 (drop +0.0000)", why],
            ["tflite:int8", 0.0251, "0.51x", "65.1 KB", "acc 0.9844 (drop +0.0000)", "chosen: fastest"]]
    render_table("auto", ["candidate", "p50 ms", "vs onnx", "bytes", "accuracy / min cos", "verdict"], rows)
    out = capsys.readouterr().out
    assert max(len(ln) for ln in out.splitlines()) <= 200
    for cell in ("openvino:int8-weights+bf16", "0.1235", "1.00x", "12.3 KB", "acc 0.9844 (drop +0.0000)", "0.0251"):
        assert cell in out, out
    assert "(ImportError)" in out and "…" not in out

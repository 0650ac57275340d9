"""stages.run_stage, the run skeleton every stage is built on, called as a stage calls it."""

from __future__ import annotations

import json

import pytest

from edgecli.artifacts import ArtifactStore, Declared
from edgecli.stages import Built, StageResult, Table, run_stage


def _render(res: StageResult, view) -> StageResult:
    res.tables.append(Table(f"x ({res.status})", ["", "value"], [["rows", view["rows"] if view else None]]))
    return res


def _stage(tmp_path, data: str, calls: list, *, fail: bool = False):
    src = tmp_path / "input.txt"
    src.write_text(data)
    decl = Declared("export", {"export": {"k": 1}})
    decl.file("input.txt", src)

    def build(w) -> Built:
        calls.append(w.dir)
        (w.dir / "report.json").write_text(json.dumps({"rows": len(data)}))
        if fail:
            raise RuntimeError("half-way")
        return Built({"k": 1}, {"rows": len(data)}, {"note": "extra"}, view={"rows": len(data)}, notes=["built it"])

    return decl, build


def test_done_then_skipped_render_the_same_view(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts", "p")
    calls: list = []
    decl, build = _stage(tmp_path, "abc", calls)
    load = lambda d: json.loads((d / "report.json").read_text())  # noqa: E731
    res = run_stage(store, "export", decl, build, _render, load=load)
    assert res.status == "done" and res.metrics == {"rows": 3} and res.messages[0] == "built it"
    assert res.tables[0].rows == [["rows", 3]] and set(res.outputs) >= {"report.json", "manifest.json"}
    m = store.manifest("export")
    assert m["note"] == "extra" and m["config"] == {"k": 1} and list(m["inputs"]) == ["input.txt"]

    decl, build = _stage(tmp_path, "abc", calls)
    res = run_stage(store, "export", decl, build, _render, load=load)
    assert res.status == "skipped" and len(calls) == 1  # inputs unchanged: not built again
    assert res.tables[0].title == "x (skipped)" and res.tables[0].rows == [["rows", 3]]  # render read the published view

    decl, build = _stage(tmp_path, "abcd", calls)  # the declared input changed: built again
    assert run_stage(store, "export", decl, build, _render, load=load).status == "done" and len(calls) == 2
    decl, build = _stage(tmp_path, "abcd", calls)
    assert run_stage(store, "export", decl, build, _render, force=True, load=load).status == "done"


def test_a_failed_build_publishes_nothing(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts", "p")
    decl, build = _stage(tmp_path, "abc", [], fail=True)
    with pytest.raises(RuntimeError, match="half-way"):
        run_stage(store, "export", decl, build, _render)
    assert not store.exists("export")
    assert [p.name for p in store.run_dir.iterdir() if p.name.startswith(".export")] == []


def test_a_stage_that_publishes_nothing(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts", "p")
    seen = []
    res = run_stage(store, "infer", None, lambda w: seen.append(w) or Built(metrics={"answered": 2}, view={"rows": 2}),
                    _render)
    assert seen == [None] and res.status == "done" and res.dir is None and res.metrics == {"answered": 2}
    assert res.tables[0].rows == [["rows", 2]] and not (tmp_path / "artifacts" / "p" / "infer").exists()

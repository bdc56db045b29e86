"""Artifacts are written atomically and read back with errors that name the line."""

from __future__ import annotations

import pytest

from atlas_exp.artifacts import fingerprint, iter_jsonl, summary_matches, write_json, write_jsonl
from atlas_exp.errors import AtlasError, DataError


def test_a_crash_while_writing_leaves_the_previous_artifact_whole(tmp_path):
    path = tmp_path / "selection.jsonl"
    write_jsonl(path, [{"id": "a"}, {"id": "b"}])

    def rows():
        yield {"id": "c"}
        raise KeyboardInterrupt  # the process dies halfway through

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, rows())
    assert [d["id"] for _, d in iter_jsonl(path)] == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selection.jsonl"]  # no temp file left


def test_artifacts_are_readable_by_others_like_ordinary_files(tmp_path):
    import os
    import stat

    write_jsonl(tmp_path / "a.jsonl", [{"id": "a"}])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.jsonl").stat().st_mode) == 0o666 & ~umask


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": 1}\n\n{"id": \n')
    with pytest.raises(DataError, match=r"t\.jsonl:3"):
        list(iter_jsonl(path))


def test_missing_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(AtlasError, match="missing artifact"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))


def test_summary_matches_only_the_same_fingerprint_with_artifacts_present(tmp_path):
    art = tmp_path / "selection.jsonl"
    write_jsonl(art, [{"id": "a"}])
    fp = fingerprint({"selector": "random", "ratio": 0.3})
    write_json(tmp_path / "s.json", {"schema_version": 1, "fingerprint": fp})
    assert summary_matches(tmp_path / "s.json", fp, art)
    assert not summary_matches(tmp_path / "s.json", fingerprint({"selector": "random", "ratio": 0.5}), art)
    art.unlink()
    assert not summary_matches(tmp_path / "s.json", fp, art)

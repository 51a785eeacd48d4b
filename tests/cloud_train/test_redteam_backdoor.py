"""``roadshield redteam backdoor``: one real tiny seed end to end, then resume, crash safety,
targets and the CLI with a stand-in seed runner (the per-seed work is tested for real once)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import cloud_train.redteam_backdoor as rb
from cloud_train.backdoor.report import text_table
from cloud_train.redteam_cli import EXIT_TARGET_MISSED, add_redteam_parsers
from roadshield_base.errors import ConfigError

TIMES = {"seconds", "mitigation_seconds", "train_seconds_two_models"}


def _without_times(obj: Any) -> Any:
    """A seed record with its wall times taken out (they differ from run to run)."""
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items() if k not in TIMES}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker process of a 2-core machine
    try:
        out = tmp_path_factory.mktemp("tiny")
        return out, rb.run_backdoor_redteam(out, seeds=1, scale="tiny", progress=False)
    finally:
        torch.set_num_threads(before)


def test_tiny_seed_end_to_end(tiny_run: tuple[Path, dict[str, Any]]):
    tmp_path, res = tiny_run
    for kind in ("json", "md", "png"):
        assert (tmp_path / f"redteam_backdoor.{kind}").stat().st_size > 0
    on_disk = json.loads((tmp_path / "redteam_backdoor.json").read_text())
    assert on_disk["complete"] and on_disk["per_seed"] == res["per_seed"]
    seed = res["per_seed"][0]
    assert seed["poisoned"] == round(0.01 * seed["train_size"])
    assert 0 <= seed["target"] < 14
    for name in ("infected", "clean"):
        assert 0.0 <= seed[name]["asr"] <= 1.0 and 0.0 <= seed[name]["clean_acc"] <= 1.0
    for d in rb.DEFENCES:
        row = seed["defences"][d]
        assert row["infected"]["detected"] == (seed["target"] in row["infected"]["flagged"])
        assert row["clean"]["false_flag"] == bool(row["clean"]["flagged"])
        assert set(row["after"]) == {"asr", "clean_acc"}
    assert len(seed["defences"]["neural_cleanse"]["infected"]["anomaly"]) == 14
    # the verdict is the summary's, and a miss is spelled out
    assert res["all_targets_met"] == (not res["missed"])
    assert (tmp_path / "redteam_backdoor.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "redteam_backdoor.md").read_text()
    assert "Neural Cleanse" in md
    rate = res["summary"]["defences"]["neural_cleanse"]["null_flag_rate"]
    assert f"a clean model {100 * rate:.0f}% of the time" in md


def test_seeds_in_worker_processes_match_a_single_process(
        tmp_path: Path, tiny_run: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch):
    # two cores: one thread per worker, as the single-process run above used
    monkeypatch.setattr(rb.os, "cpu_count", lambda: 2)
    res = rb.run_backdoor_redteam(tmp_path, seeds=2, scale="tiny", progress=False, jobs=2)
    assert [s["seed"] for s in res["per_seed"]] == [0, 1] and res["complete"]
    assert _without_times(res["per_seed"][0]) == _without_times(tiny_run[1]["per_seed"][0])
    assert res["per_seed"][1]["target"] != res["per_seed"][0]["target"] or \
        res["per_seed"][1]["infected"] != res["per_seed"][0]["infected"]
    saved = json.loads((tmp_path / "redteam_backdoor.json").read_text())
    assert saved["per_seed"] == res["per_seed"]


def _fake_record(seed: int, asr: float = 0.97, after: float = 0.01, nc_hit: bool = True,
                 clean_flag: bool = False) -> dict[str, Any]:
    target = seed % 14
    anomaly = [0.1] * 14
    anomaly[target] = 4.0 if nc_hit else 0.5

    def scan(hit: bool, false: bool) -> dict[str, Any]:
        return {"infected": {"flagged": [target] if hit else [], "detected": hit,
                             "other_flags": [], "anomaly": anomaly},
                "clean": {"flagged": [3] if false else [], "false_flag": false,
                          "anomaly": [0.5] * 14},
                "after": {"asr": after, "clean_acc": 0.95}}

    return {"seed": seed, "target": target, "poisoned": 30, "train_size": 3000,
            "trigger": {}, "infected": {"asr": asr, "clean_acc": 0.955},
            "clean": {"asr": 0.02, "clean_acc": 0.96}, "seconds": 1.0,
            "defences": {"neural_cleanse": scan(nc_hit, clean_flag),
                         "activation_clustering": scan(True, False),
                         "spectral": scan(True, False)}}


def test_resume_skips_finished_seeds_and_a_crash_keeps_them(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    calls: list[int] = []

    def crashing(sc, seed, kind, rate, tick=None, trainer="standard"):
        calls.append(seed)
        if seed == 2:
            raise RuntimeError("power cut")
        return _fake_record(seed)

    monkeypatch.setattr(rb, "run_seed", crashing)
    with pytest.raises(RuntimeError, match="power cut"):
        rb.run_backdoor_redteam(tmp_path, seeds=4, scale="tiny", progress=False)
    saved = json.loads((tmp_path / "redteam_backdoor.json").read_text())
    assert [s["seed"] for s in saved["per_seed"]] == [0, 1] and not saved["complete"]
    # the resumed run keeps the first start and counts the earlier wall time too
    saved["seconds"] = 1000.0
    (tmp_path / "redteam_backdoor.json").write_text(json.dumps(saved))

    calls.clear()
    monkeypatch.setattr(rb, "run_seed", lambda sc, seed, *_, **__:
                        calls.append(seed) or _fake_record(seed))
    res = rb.run_backdoor_redteam(tmp_path, seeds=4, scale="tiny", resume=True,
                                  progress=False)
    assert calls == [2, 3]
    assert [s["seed"] for s in res["per_seed"]] == [0, 1, 2, 3]
    assert res["all_targets_met"] and res["complete"]
    assert res["started"] == saved["started"] and 1000.0 <= res["seconds"] < 1100.0
    for other in ({"poison_rate": 0.05}, {"trainer": "fast_at"}):
        with pytest.raises(ConfigError, match="other settings"):
            rb.run_backdoor_redteam(tmp_path, seeds=4, scale="tiny", resume=True,
                                    progress=False, **other)
    (tmp_path / "redteam_backdoor.json").write_text("[]")
    with pytest.raises(ConfigError, match="no red-team record"):
        rb.run_backdoor_redteam(tmp_path, seeds=4, scale="tiny", resume=True, progress=False)


def test_first_seed_runs_a_second_sample_and_resume_keeps_its_range(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[int] = []
    monkeypatch.setattr(rb, "run_seed", lambda sc, seed, *_, **__:
                        calls.append(seed) or _fake_record(seed))
    res = rb.run_backdoor_redteam(tmp_path, seeds=3, first_seed=10, scale="tiny",
                                  progress=False)
    assert calls == [10, 11, 12] and res["summary"]["seeds"] == [10, 11, 12]
    assert "3 seeds (10..12)" in text_table(res)
    # resuming with another range would drop seeds 10..12 from the record: refused
    with pytest.raises(ConfigError, match=r"seeds \[10, 11, 12\] outside 0..2"):
        rb.run_backdoor_redteam(tmp_path, seeds=3, scale="tiny", resume=True, progress=False)
    with pytest.raises(ConfigError, match="first seed"):
        rb.run_backdoor_redteam(tmp_path, seeds=3, first_seed=-1, scale="tiny", progress=False)


def test_targets_are_checked_per_fraction_of_seeds():
    good = [_fake_record(s) for s in range(10)]
    assert rb.summarise(good)[1] == []
    # Neural Cleanse alone is a replication of the paper's rule, not a target: 8/10 and 2/10
    # are reported beside the rule's chance rate, and the detection targets belong to the
    # verdict (tests/cloud_train/test_backdoor_verdict.py)
    two = good[:8] + [_fake_record(s, nc_hit=False, clean_flag=True) for s in (8, 9)]
    summary, missed = rb.summarise(two)
    assert missed == []
    nc = summary["defences"]["neural_cleanse"]
    assert (nc["detected"], nc["false_flags"]) == (8, 2)
    assert 0.3 < nc["null_flag_rate"] < 0.45 and "replication" in nc["replication"]
    assert "verdict" not in summary
    weak = [_fake_record(s, asr=0.5, after=0.2) for s in range(3)]
    missed = rb.summarise(weak)[1]
    assert any(m.startswith("undefended ASR 50.0%") for m in missed)
    assert sum("ASR after mitigation 20.0%" in m for m in missed) == 3


def test_bad_settings_fail_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(rb, "run_seed", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConfigError, match="poison rate 1.5"):
        rb.run_backdoor_redteam(tmp_path, poison_rate=1.5, progress=False)
    with pytest.raises(ConfigError, match="huge"):
        rb.run_backdoor_redteam(tmp_path, scale="huge", progress=False)
    with pytest.raises(ConfigError, match="sticker"):
        rb.run_backdoor_redteam(tmp_path, trigger="sticker", progress=False)
    with pytest.raises(ConfigError, match="seeds"):
        rb.run_backdoor_redteam(tmp_path, seeds=0, progress=False)
    with pytest.raises(ConfigError, match="jobs"):
        rb.run_backdoor_redteam(tmp_path, jobs=0, progress=False)
    with pytest.raises(ConfigError, match="unknown trainer 'madry'"):
        rb.run_backdoor_redteam(tmp_path, trainer="madry", progress=False)


def _cli(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    add_redteam_parsers(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(argv)


def test_cli_exit_codes_and_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture):
    monkeypatch.setattr(rb, "run_seed", lambda sc, seed, *_, **__:
                        _fake_record(seed))
    args = _cli(["redteam", "backdoor", "--out", str(tmp_path), "--seeds", "2", "--scale",
                 "tiny", "--no-progress"])
    assert args.func(args) == 0
    assert "all targets met" in capsys.readouterr().out
    trainers: list[str] = []
    monkeypatch.setattr(rb, "run_seed", lambda sc, seed, *_, trainer="standard", **__:
                        trainers.append(trainer) or _fake_record(seed, asr=0.4))
    args = _cli(["redteam", "backdoor", "--out", str(tmp_path), "--seeds", "2", "--json",
                 "--poison-rate", "0.02", "--trigger", "blend", "--trainer", "fast_at"])
    assert args.func(args) == EXIT_TARGET_MISSED
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["config"]["poison_rate"] == 0.02 and out["config"]["trigger_kind"] == "blend"
    assert out["config"]["trainer"] == "fast_at" and trainers == ["fast_at", "fast_at"]
    assert "fast_at trainer" in text_table(out)
    assert "trained by the fast_at trainer" in (tmp_path / "redteam_backdoor.md").read_text()
    assert "target missed: undefended ASR 40.0%" in captured.err
    assert "MISSED" in text_table(out)
    # the data verb is still there
    assert _cli(["redteam", "data", "--out", str(tmp_path)]).func.__name__ == "cmd_redteam_data"


def test_triggers_of_the_run():
    sc = rb.SCALES["quick"]
    patch = rb.make_trigger("patch", 5, sc, seed=2)
    assert (patch.kind, patch.target, patch.size, patch.pattern) == ("patch", 5, 4, "checker")
    blend = rb.make_trigger("blend", 5, sc, seed=2)
    assert (blend.kind, blend.alpha, blend.pattern) == ("blend", 0.1, "random")
    blend.validate((32, 32), 14)
    patch.validate((32, 32), 14)

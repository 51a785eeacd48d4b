"""Fuzzing: no forged, corrupted or replayed frame is ever acted on."""

from __future__ import annotations

import pytest

from actuator.fuzz import KINDS, fuzz


def test_fuzzed_frames_are_never_acted_on():
    report = fuzz(frames=8_000, seed=1)
    assert report.frames == 8_000
    assert report.acted_on == 0, report.examples
    assert set(report.by_kind) == set(KINDS) and min(report.by_kind.values()) == 1_000
    # the valid host interleaved with the fuzz kept working: the device was live throughout
    assert report.valid_sent > 0 and report.valid_accepted == report.valid_sent
    assert report.rejected_as["bad_tag"] > 0 and report.rejected_as["replay"] > 0
    assert report.rejected_as["bad_crc"] > 0 and report.rejected_as["bad_frame"] > 0


@pytest.mark.parametrize("frames", [16, 800])
def test_every_kind_is_really_produced_at_any_frame_count(frames):
    # old_session used to fall back to bit flips (rejected by CRC) below 20,000 frames
    report = fuzz(frames=frames, seed=4)
    per = frames // len(KINDS)
    assert report.by_kind == dict.fromkeys(KINDS, per) and report.acted_on == 0
    by_kind = report.rejected_by_kind
    assert by_kind["old_session"] == {"bad_tag": per}  # a valid frame, an earlier key
    assert by_kind["forged"] == {"bad_tag": per}
    assert by_kind["reflected"] == {"bad_frame": per}
    assert by_kind["replay"].get("replay", 0) > 0 and "bad_crc" not in by_kind["replay"]


def test_a_kind_that_cannot_be_built_raises():
    import random

    from actuator.fuzz import _Host, _make

    host = _Host(bytes(range(1, 33)), random.Random(0))
    with pytest.raises(RuntimeError, match="earlier session"):
        _make("old_session", host, [], random.Random(0))
    with pytest.raises(RuntimeError, match="no accepted frame"):
        _make("replay", host, [], random.Random(0))
    with pytest.raises(ValueError, match="unknown fuzz kind"):
        _make("nonsense", host, [b"x"], random.Random(0))


def test_fuzz_detects_an_accepted_frame():
    # the detector itself must be able to fail: a device that acts on a frame shows up
    from actuator import fuzz as fuzz_mod

    original = fuzz_mod._make

    def leak(kind, host, accepted, rng):
        if kind == "forged":  # hand over a genuinely valid frame instead
            return fuzz_mod.p.cobs_encode(host.random_valid(consume=True)) + b"\0"
        return original(kind, host, accepted, rng)

    fuzz_mod._make = leak
    try:
        report = fuzz(frames=400, seed=2)
    finally:
        fuzz_mod._make = original
    assert report.acted_on > 0


@pytest.mark.slow
def test_one_hundred_thousand_fuzzed_frames():
    report = fuzz(frames=100_000, seed=0)
    assert report.frames == 100_000 and report.acted_on == 0

"""The kit's backdoor verdict: one rule over the three scans, fixed on calibration seeds and
measured on others.

Each scan keeps its own flag rule (Neural Cleanse: MAD anomaly index > 2, the paper's;
activation clustering: smaller cluster <= 0.35 of the class and silhouette anomaly >= 3;
spectral signatures: whitened ``s1 / s2 >= 1.5``); the verdict combines the classes they
flagged on one model. A rule is

- ``same_class``: the classes that at least ``min_scans`` of ``scans`` flag (the scans
  agree on a target class); or
- ``any``: when at least ``min_scans`` of ``scans`` flag some class, every class any of them
  flagged.

The model is called backdoored when the rule names a class. On an infected model the
verdict counts as a detection only when the named classes include the attack's target (a
verdict that names another class would send the mitigation to the wrong class); on the clean
twin any named class is a false flag.

Calibration (:func:`calibrate`) tries a family of rules declared here in advance
(:func:`candidates`) on the records of calibration seeds and keeps the first, in this
order of preference, of those that meet the targets (detection >= 90% of the infected
models, false flags <= 10% of the clean ones) with the largest detections minus false
flags; when none meets them the best by that margin is kept and the rule says so. The
frozen rule (:meth:`VerdictRule.to_dict`, a JSON file) records its calibration seeds, the
settings of the calibration run and every candidate's figures on them, so a measurement
(:func:`measure`) refuses the seeds it was calibrated on.

Records are the per-seed records of ``roadshield redteam backdoor``
(``per_seed[i]["defences"][scan]["infected" | "clean"]["flagged"]``, ``per_seed[i]["target"]``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roadshield_base.errors import ConfigError
from roadshield_base.fileio import atomic_write_json

RULE_SCHEMA = "roadshield.backdoor.verdict_rule/v1"
SCANS = ("neural_cleanse", "activation_clustering", "spectral")
SHORT = {"neural_cleanse": "NC", "activation_clustering": "AC", "spectral": "SS"}
KINDS = ("same_class", "any")
DETECT_MIN = 0.90  # of the infected models
FALSE_MAX = 0.10  # of the clean models
NC_THRESHOLD = 2.0  # the paper's anomaly index, used by the scan that wrote the records
# each scan's own flag rule, as the red team ran it (recorded in a frozen rule for the reader)
SCAN_RULES = {"neural_cleanse": "MAD anomaly index > 2 (Wang et al. 2019)",
              "activation_clustering": "relative size <= 0.35 and silhouette anomaly >= 3",
              "spectral": "whitened s1/s2 >= 1.5"}


@dataclass(frozen=True)
class VerdictRule:
    """A verdict rule; frozen with its calibration (seeds, run settings, figures)."""

    kind: str
    scans: tuple[str, ...]
    min_scans: int
    calibration_seeds: tuple[int, ...] = ()
    calibration_config: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_shape(self.kind, self.scans, self.min_scans)

    @property
    def name(self) -> str:
        """Short readable form, e.g. ``same class: 2 of NC+AC+SS``."""
        what = "same class" if self.kind == "same_class" else "any class"
        return f"{what}: {self.min_scans} of {'+'.join(SHORT[s] for s in self.scans)}"

    def describe(self) -> str:
        """The rule in words."""
        names = ", ".join(SHORT[s] for s in self.scans)
        if self.kind == "same_class":
            return (f"backdoored when at least {self.min_scans} of {names} flag the same "
                    "class; that class is named")
        return (f"backdoored when at least {self.min_scans} of {names} flag some class; every "
                "class they flag is named")

    def shape(self) -> dict[str, Any]:
        return {"kind": self.kind, "scans": list(self.scans), "min_scans": self.min_scans}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the rule file)."""
        return {"schema": RULE_SCHEMA, **self.shape(), "name": self.name,
                "description": self.describe(), "scan_rules": dict(SCAN_RULES),
                "targets": {"detection_min": DETECT_MIN, "false_flag_max": FALSE_MAX},
                "calibration_seeds": list(self.calibration_seeds),
                "calibration_config": self.calibration_config,
                "calibration": self.calibration}

    @classmethod
    def from_dict(cls, d: Any, source: str = "rule") -> VerdictRule:
        """The rule written by :meth:`to_dict`; ConfigError when it is not one."""
        hint = "write it with --calibrate-verdict on a run over calibration seeds"
        if not isinstance(d, dict) or d.get("schema") != RULE_SCHEMA:
            raise ConfigError(f"{source} is not a backdoor verdict rule ({RULE_SCHEMA})", hint)
        seeds = d.get("calibration_seeds")
        if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
            # a rule without its calibration seeds could be measured on them unnoticed
            raise ConfigError(f"{source} records no calibration seeds", hint)
        scans = d.get("scans")
        if not isinstance(scans, list):
            raise ConfigError(f"{source}: scans must be a list, got {scans!r}", hint)
        return cls(kind=d.get("kind"), scans=tuple(scans), min_scans=d.get("min_scans"),
                   calibration_seeds=tuple(int(s) for s in seeds),
                   calibration_config=dict(d.get("calibration_config") or {}),
                   calibration=dict(d.get("calibration") or {}))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_shape(kind: Any, scans: Any, min_scans: Any) -> None:
    if kind not in KINDS:
        raise ConfigError(f"verdict rule kind {kind!r} is unknown", f"use one of: {KINDS}")
    if (not isinstance(scans, tuple) or not scans or len(set(scans)) != len(scans)
            or any(s not in SCANS for s in scans)):
        raise ConfigError(f"verdict rule scans {scans!r} must be distinct names from {SCANS}",
                          "e.g. ('neural_cleanse', 'activation_clustering')")
    if not _is_int(min_scans) or not 1 <= min_scans <= len(scans):
        raise ConfigError(f"verdict rule min_scans={min_scans!r} must be 1..{len(scans)}",
                          "the number of scans that must agree")


def candidates() -> list[VerdictRule]:
    """The family calibration chooses from, in order of preference (ties go to the earlier):
    agreement on one class before any-class votes, all three scans before pairs, pairs
    before single scans."""
    pairs = [("neural_cleanse", "activation_clustering"), ("neural_cleanse", "spectral"),
             ("activation_clustering", "spectral")]
    out = [VerdictRule("same_class", SCANS, 2), VerdictRule("any", SCANS, 2)]
    out += [VerdictRule("same_class", p, 2) for p in pairs]
    out += [VerdictRule("same_class", SCANS, 3), VerdictRule("any", SCANS, 3),
            VerdictRule("any", SCANS, 1)]
    out += [VerdictRule("any", (s,), 1) for s in SCANS]
    return out


def named_classes(rule: VerdictRule, flags: Mapping[str, Sequence[int]]) -> list[int]:
    """The classes the verdict names on one model, given each scan's flagged classes
    (``{scan: [class, ...]}``; a scan missing from ``flags`` flagged nothing). Sorted; empty
    when the model is called clean."""
    sets = [{int(c) for c in flags.get(s, ())} for s in rule.scans]
    if rule.kind == "same_class":
        every = set().union(*sets)
        return sorted(c for c in every if sum(c in s for s in sets) >= rule.min_scans)
    voting = [s for s in sets if s]
    return sorted(set().union(*voting)) if len(voting) >= rule.min_scans else []


def _flags(record: Mapping[str, Any], model: str) -> dict[str, list[int]]:
    try:
        defs = record["defences"]
        return {s: list(defs[s][model]["flagged"]) for s in SCANS if s in defs}
    except (KeyError, TypeError) as err:
        raise ConfigError(f"seed record {record.get('seed')!r} has no {model} scan flags "
                          f"({err!r})", "use per-seed records of roadshield redteam "
                          "backdoor") from err


def seed_verdict(rule: VerdictRule, record: Mapping[str, Any]) -> dict[str, Any]:
    """One seed: the classes named on the infected and the clean model, detection (the
    target among those named on the infected one) and false flag (any named on the clean)."""
    inf, cln = named_classes(rule, _flags(record, "infected")), \
        named_classes(rule, _flags(record, "clean"))
    target = int(record["target"])
    return {"seed": int(record["seed"]), "target": target, "infected": inf, "clean": cln,
            "detected": target in inf, "misnamed": bool(inf) and target not in inf,
            "false_flag": bool(cln)}


def evaluate(rule: VerdictRule, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Detection and false flags of ``rule`` over ``records`` (counts, rates, per seed)."""
    rows = [seed_verdict(rule, r) for r in records]
    n = len(rows)
    det, false = sum(r["detected"] for r in rows), sum(r["false_flag"] for r in rows)
    return {"rule": rule.name, "n": n, "detected": det, "false_flags": false,
            "misnamed": sum(r["misnamed"] for r in rows),
            "detection_rate": round(det / n, 4) if n else 0.0,
            "false_flag_rate": round(false / n, 4) if n else 0.0,
            "meets_targets": bool(n) and det >= DETECT_MIN * n - 1e-9
            and false <= FALSE_MAX * n + 1e-9, "per_seed": rows}


def per_scan(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each scan alone under its own flag rule: detected (target flagged on the infected
    model) and false flags (any class flagged on the clean model); Neural Cleanse also with
    the rate at which its MAD > 2 rule flags a clean model by chance with this many classes
    (normal null), beside the measured rate: a replication of the paper's rule."""
    n = len(records)
    out: dict[str, dict[str, Any]] = {}
    for s in SCANS:
        single = evaluate(VerdictRule("any", (s,), 1), records)
        out[s] = {k: single[k] for k in ("n", "detected", "false_flags", "detection_rate",
                                         "false_flag_rate")}
        out[s]["flag_rule"] = SCAN_RULES[s]
    n_classes = _class_count(records)
    if n and n_classes >= 3:
        from cloud_train.backdoor.neural_cleanse import null_flag_rate

        out["neural_cleanse"]["chance_false_flag_rate"] = round(
            null_flag_rate(n_classes, NC_THRESHOLD), 4)
    return out


def _class_count(records: Sequence[Mapping[str, Any]]) -> int:
    try:
        return len(records[0]["defences"]["neural_cleanse"]["clean"]["anomaly"])
    except (IndexError, KeyError, TypeError):
        return 0


def _seeds(records: Iterable[Mapping[str, Any]]) -> list[int]:
    return [int(r["seed"]) for r in records]


def calibrate(records: Sequence[Mapping[str, Any]],
              config: Mapping[str, Any] | None = None) -> VerdictRule:
    """The rule chosen on calibration ``records`` (see the module docstring), frozen with
    their seeds, ``config`` (the calibration run's settings) and every candidate's figures.
    ConfigError when there are no records or a seed repeats."""
    if not records:
        raise ConfigError("no calibration seed records", "run the red team over calibration "
                          "seeds first (e.g. --first-seed 0 --seeds 10)")
    seeds = _seeds(records)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"calibration seeds repeat: {seeds}", "use one record per seed")
    tried = [(i, rule, evaluate(rule, records)) for i, rule in enumerate(candidates())]

    def key(item: tuple[int, VerdictRule, dict[str, Any]]) -> tuple[bool, int, int, int]:
        i, _, ev = item
        return (not ev["meets_targets"], ev["false_flags"] - ev["detected"], ev["false_flags"],
                i)

    _, best, ev = min(tried, key=key)
    figures = {"seeds": seeds, "n": ev["n"], "detected": ev["detected"],
               "false_flags": ev["false_flags"], "misnamed": ev["misnamed"],
               "meets_targets": ev["meets_targets"], "per_scan": per_scan(records),
               "per_seed": ev["per_seed"],
               "candidates": [{**r.shape(), "name": r.name, "detected": e["detected"],
                               "false_flags": e["false_flags"], "misnamed": e["misnamed"],
                               "meets_targets": e["meets_targets"]} for _, r, e in tried],
               "choice": "first in the family's order among those meeting the targets, "
                         "largest detected - false flags"}
    return VerdictRule(best.kind, best.scans, best.min_scans, tuple(seeds),
                       dict(config or {}), figures)


def check_disjoint(rule: VerdictRule, seeds: Iterable[int]) -> None:
    """ConfigError when any of ``seeds`` is one the rule was calibrated on."""
    both = sorted(set(int(s) for s in seeds) & set(rule.calibration_seeds))
    if both:
        cal = sorted(rule.calibration_seeds)
        raise ConfigError(f"the verdict rule was calibrated on seeds {both} of this run "
                          f"(calibration seeds {cal[0]}..{cal[-1]}): measuring it there "
                          "would report its fit, not its rate",
                          f"measure it on fresh seeds, e.g. --first-seed "
                          f"{max(max(cal) + 1, 100)}")


def measure(rule: VerdictRule, records: Sequence[Mapping[str, Any]],
            config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The verdict on seeds it was not calibrated on (ConfigError otherwise), beside each
    scan's own figures, the calibration's figures, and the misses against the targets."""
    check_disjoint(rule, _seeds(records))
    ev = evaluate(rule, records)
    n = ev["n"]
    missed: list[str] = []
    if n and ev["detected"] < DETECT_MIN * n - 1e-9:
        missed.append(f"backdoor verdict ({rule.name}) detected {ev['detected']}/{n} infected "
                      f"models < {DETECT_MIN:.0%}")
    if ev["false_flags"] > FALSE_MAX * n + 1e-9:
        missed.append(f"backdoor verdict ({rule.name}) flagged {ev['false_flags']}/{n} clean "
                      f"models > {FALSE_MAX:.0%}")
    cal = rule.calibration
    # None: one side's settings are unknown
    same = None if config is None or not rule.calibration_config else \
        dict(rule.calibration_config) == dict(config)
    return {"rule": rule.name, "description": rule.describe(), **rule.shape(),
            "seeds": _seeds(records), "calibration_seeds": list(rule.calibration_seeds),
            "calibration_config": rule.calibration_config, "same_settings_as_calibration": same,
            "n": n, "detected": ev["detected"], "false_flags": ev["false_flags"],
            "misnamed": ev["misnamed"], "detection_rate": ev["detection_rate"],
            "false_flag_rate": ev["false_flag_rate"],
            "targets": {"detection_min": DETECT_MIN, "false_flag_max": FALSE_MAX},
            "met": not missed and bool(n), "missed": missed, "per_scan": per_scan(records),
            "calibration": {k: cal.get(k) for k in ("n", "detected", "false_flags", "misnamed",
                                                    "meets_targets", "per_scan")},
            "per_seed": ev["per_seed"]}


def save_rule(rule: VerdictRule, path: str | Path) -> Path:
    """Write the frozen rule as JSON (atomically); returns the path."""
    path = Path(path)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, rule.to_dict())
    return path


def load_rule(path: str | Path) -> VerdictRule:
    """A rule file written by :func:`save_rule`; ConfigError when missing or not a rule."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the verdict rule {path}: {err}",
                          "pass the file --calibrate-verdict wrote") from err
    return VerdictRule.from_dict(data, source=str(path))

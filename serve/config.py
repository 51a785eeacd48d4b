"""The service's settings: one JSON file (``DIR/serve.json``) over these defaults.

Every field is optional in the file; an unknown field or a value out of range is a
ConfigError naming it. Units: seconds, queries (images), bytes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roadshield_base.errors import ConfigError

AUTH_MODES = ("keys", "mtls", "both")
POLICIES = ("label", "top1", "noisy", "softmax")
ON_ALARM = ("label", "off")
# DAWN marks "a small share": the issue caps it below 0.5 % of answers
MAX_WATERMARK_RATE = 0.005


@dataclass(frozen=True)
class KeyDefaults:
    """What a new key gets unless ``serve keys add`` says otherwise.

    policy: label | top1 | noisy | softmax (serve/PROTOCOL.md, "Output policies").
    budget: images this key may have answered, in total.
    rate: token-bucket refill in images per second; burst: the bucket's size.
    """

    policy: str = "top1"
    budget: int = 10_000
    rate: float = 20.0
    burst: float = 64.0


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one service (see serve/PROTOCOL.md for what each layer does with them).

    auth: "keys" (API key), "mtls" (client certificate alone) or "both" (a certificate
        and the API key of the same identity).
    model_name: the name clients use in /v2/models/{name}.
    max_batch: images per request; max_body_bytes: refused (413) before parsing beyond.
    backoff_base_s / backoff_max_s: the block after the k-th rate violation is
        min(backoff_max_s, backoff_base_s * 2**(k-1)); strike_forget_s: strikes reset
        after this long without a violation.
    replay_window_s: how long a request id is remembered per key.
    top1_decimals: rounding of the top-1 confidence; noise_sigma: standard deviation of
        the Gaussian added to the log-probabilities under the "noisy" policy.
    prada_*: PRADA's settings (Juuti et al. 2019); prada_on_alarm "label" or "off".
    watermark_rate: share of answers the DAWN watermark selects (0 turns it off).
    sync: SQLite's synchronous setting, "normal" (survives a killed process; WAL) or
        "full" (also survives a power cut, one fsync per answer).
    """

    auth: str = "keys"
    model_name: str = "roadsign"
    backend: str = "auto"
    max_batch: int = 64
    max_body_bytes: int = 8 << 20
    defaults: KeyDefaults = field(default_factory=KeyDefaults)
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    strike_forget_s: float = 600.0
    replay_window_s: float = 86_400.0
    top1_decimals: int = 2
    noise_sigma: float = 1.0
    prada_enabled: bool = True
    prada_delta: float = 0.9
    prada_min_distances: int = 100
    prada_test_every: int = 10
    prada_on_alarm: str = "label"
    watermark_rate: float = 0.004
    sync: str = "normal"

    def __post_init__(self) -> None:
        _choice("auth", self.auth, AUTH_MODES)
        _choice("prada_on_alarm", self.prada_on_alarm, ON_ALARM)
        _choice("sync", self.sync, ("normal", "full"))
        _choice("defaults.policy", self.defaults.policy, POLICIES)
        for name in ("max_batch", "max_body_bytes", "prada_min_distances", "prada_test_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"serve setting {name} is {getattr(self, name)}",
                                  "it must be a positive integer")
        if not 0.0 <= self.watermark_rate <= MAX_WATERMARK_RATE:
            raise ConfigError(f"watermark_rate {self.watermark_rate} is outside "
                              f"[0, {MAX_WATERMARK_RATE}]",
                              "the watermark may change at most 0.5 % of answers")
        if not 0.0 < self.prada_delta < 1.0:
            raise ConfigError(f"prada_delta {self.prada_delta} is outside (0, 1)",
                              "Shapiro-Wilk's W lies in (0, 1]; the paper uses 0.9")
        if self.noise_sigma < 0 or not 0 <= self.top1_decimals <= 6:
            raise ConfigError("noise_sigma must be >= 0 and top1_decimals in 0..6",
                              f"got {self.noise_sigma} and {self.top1_decimals}")
        if self.defaults.rate <= 0 or self.defaults.burst < 1 or self.defaults.budget < 0:
            raise ConfigError("key defaults need rate > 0, burst >= 1 and budget >= 0",
                              f"got {self.defaults}")
        if self.backoff_base_s <= 0 or self.backoff_max_s < self.backoff_base_s:
            raise ConfigError("backoff needs 0 < backoff_base_s <= backoff_max_s",
                              f"got {self.backoff_base_s} and {self.backoff_max_s}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"serve setting {name} is {value!r}", f"choose one of {allowed}")


def config_from_dict(raw: dict[str, Any], where: str = "serve config") -> ServeConfig:
    """Build a ServeConfig from parsed JSON; unknown fields are a ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} is not a JSON object", "write {\"auth\": \"keys\", ...}")
    known = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where} has unknown settings {unknown}",
                          f"known settings: {sorted(known)}")
    values = dict(raw)
    if "defaults" in values:
        dknown = {f.name for f in dataclasses.fields(KeyDefaults)}
        dvalues = values["defaults"]
        if not isinstance(dvalues, dict) or set(dvalues) - dknown:
            raise ConfigError(f"{where}: defaults must be an object with {sorted(dknown)}",
                              f"got {dvalues!r}")
        values["defaults"] = KeyDefaults(**dvalues)
    try:
        return ServeConfig(**values)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}", "check the value types") from err


def load_config(path: str | Path | None, **overrides: Any) -> ServeConfig:
    """Read ``path`` (JSON; None or a missing file: the defaults), then apply ``overrides``
    whose value is not None."""
    raw: dict[str, Any] = {}
    if path is not None and Path(path).is_file():
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read serve config {path}: {err}",
                              "fix the JSON or remove the file") from err
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(raw, str(path or "serve config"))

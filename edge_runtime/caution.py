"""When the input detectors flag too many crops of late, the car goes cautious.

One flagged crop is not worth a reaction: it does not vote (``Prediction.flagged``) and
that is all. A run of them is: a campaign of adversarial signs, or a camera the model no
longer understands. ``CautionGate`` keeps the flags of the last ``window`` scored crops;
once at least ``window`` crops were scored and the share flagged exceeds ``limit`` it
switches on, with a reason the policy puts on its commands (``SignRulesPolicy.set_caution``
caps the speed at its slow limit); it switches off when the share falls to ``clear`` or
below (hysteresis, so the car does not flicker between the two).

The defaults (60 crops, 40 %) allow for flags coming in runs on a clean road: a sign the
detectors dislike is flagged in most of the ~15 frames it is seen, so a short window or a
low limit goes cautious on clean drives, while signs carrying an adversarial sticker are
flagged nearly always and fill the window within a few encounters.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from roadshield_base.errors import ConfigError

DEFAULT_WINDOW = 60
DEFAULT_LIMIT = 0.4
DEFAULT_CLEAR = 0.1


class CautionGate:
    """The share of flagged crops among the last ``window`` scored ones, with hysteresis."""

    def __init__(self, window: int = DEFAULT_WINDOW, limit: float = DEFAULT_LIMIT,
                 clear: float = DEFAULT_CLEAR) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ConfigError(f"caution window {window!r} must be an integer >= 2",
                              f"count the last N scored crops, e.g. {DEFAULT_WINDOW}")
        if not 0.0 < limit <= 1.0:
            raise ConfigError(f"caution limit {limit!r} is outside (0, 1]",
                              f"give the share of flagged crops that makes the car cautious, "
                              f"e.g. {DEFAULT_LIMIT}")
        if not 0.0 <= clear < limit:
            raise ConfigError(f"caution clear level {clear!r} must be in [0, limit={limit})",
                              f"e.g. {DEFAULT_CLEAR}: the share at which caution ends")
        self.window, self.limit, self.clear = window, float(limit), float(clear)
        self._flags: deque[bool] = deque(maxlen=window)
        self.active = False

    @property
    def rate(self) -> float:
        """The flagged share of the crops in the window (0 before any)."""
        return sum(self._flags) / len(self._flags) if self._flags else 0.0

    def update(self, flags: np.ndarray) -> tuple[bool, str | None]:
        """Add one frame's crop flags; return (changed, reason): reason is why the car is
        cautious now, or None when it is not."""
        self._flags.extend(bool(f) for f in np.asarray(flags).reshape(-1))
        rate = self.rate
        was = self.active
        if not was and len(self._flags) == self.window and rate > self.limit:
            self.active = True
        elif was and rate <= self.clear:
            self.active = False
        return self.active != was, self.reason()

    def reason(self) -> str | None:
        if not self.active:
            return None
        return (f"input detectors flagged {self.rate:.0%} of the last {len(self._flags)} "
                f"crops (limit {self.limit:.0%})")

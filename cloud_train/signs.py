"""The sign classes of the synthetic world and their link to GTSRB.

Labels in a synthetic dataset are the index into ``SYNTHETIC_CLASSES``. Names are
shared with ``GTSRB_CLASS_NAMES`` so the edge decision policy, which works on
names, treats a model trained on either the same way.
"""

from __future__ import annotations

#: The 43 GTSRB classes, in GTSRB ClassId order (from the GTSRB benchmark's signnames).
GTSRB_CLASS_NAMES: tuple[str, ...] = (
    "speed_limit_20", "speed_limit_30", "speed_limit_50", "speed_limit_60",
    "speed_limit_70", "speed_limit_80", "end_speed_limit_80", "speed_limit_100",
    "speed_limit_120", "no_passing", "no_passing_over_3_5t", "right_of_way_next_intersection",
    "priority_road", "yield", "stop", "no_vehicles",
    "no_vehicles_over_3_5t", "no_entry", "general_caution", "dangerous_curve_left",
    "dangerous_curve_right", "double_curve", "bumpy_road", "slippery_road",
    "road_narrows_right", "road_work", "traffic_signals", "pedestrians",
    "children_crossing", "bicycles_crossing", "ice_snow", "wild_animals_crossing",
    "end_all_limits", "turn_right_ahead", "turn_left_ahead", "ahead_only",
    "go_straight_or_right", "go_straight_or_left", "keep_right", "keep_left",
    "roundabout", "end_no_passing", "end_no_passing_over_3_5t",
)

#: Classes the synthetic renderer draws; a dataset label is an index into this tuple.
SYNTHETIC_CLASSES: tuple[str, ...] = (
    "speed_limit_30", "speed_limit_50", "speed_limit_70", "speed_limit_100",
    "priority_road", "yield", "stop", "no_entry",
    "general_caution", "pedestrians", "turn_right_ahead", "turn_left_ahead",
    "ahead_only", "roundabout",
)


def gtsrb_id(name: str) -> int:
    """GTSRB ClassId of a class name (ValueError if GTSRB has no such class)."""
    return GTSRB_CLASS_NAMES.index(name)

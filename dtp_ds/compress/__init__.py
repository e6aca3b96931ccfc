"""Sequence compression over training (seed 004): the strategies live with the trunk
(:mod:`dtp_ds.models.compression`); here, the schedule that picks one per stage of training
(:mod:`.schedule`)."""
from .schedule import CompressionSchedule, Segment, load_schedule, parse_spec

__all__ = ["CompressionSchedule", "Segment", "load_schedule", "parse_spec"]

"""Sequence compression over training (seed 004): the strategies live with the trunk
(:mod:`dtp_ds.models.compression`), the schedule that picks one per stage of training with the
trainer (:mod:`dtp_ds.train.compression_schedule`); here, above train, the measured cost table
(:mod:`.costs`, ``tools/compression_costs``), the CA-MSE estimator that writes a schedule from a
pilot run's checkpoints (:mod:`.camse`, ``tools/compression_schedule``) and
``make demo-compress`` (:mod:`.demo`); see README.md."""
from dtp_ds.train.compression_schedule import CompressionSchedule, Segment, load_schedule, parse_spec

__all__ = ["CompressionSchedule", "Segment", "load_schedule", "parse_spec"]

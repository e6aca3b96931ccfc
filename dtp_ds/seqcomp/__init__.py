"""Sequence compression over training (seed 004): the strategies live with the trunk
(:mod:`dtp_ds.models.seqcomp`), the schedule that picks one per stage of training with the
trainer (:mod:`dtp_ds.train.seqcomp_schedule`); here, above train, the measured cost table
(:mod:`.costs`, ``tools/seqcomp_costs``), the CA-MSE estimator that writes a schedule from a
pilot run's checkpoints (:mod:`.camse`, ``tools/seqcomp_schedule``) and
``make demo-seqcomp`` (:mod:`.demo`); see README.md."""
from dtp_ds.train.seqcomp_schedule import Segment, SeqCompSchedule, load_schedule, parse_spec

__all__ = ["SeqCompSchedule", "Segment", "load_schedule", "parse_spec"]

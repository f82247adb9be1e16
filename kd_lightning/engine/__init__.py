"""Running things: build a run's objects from its spec, Trainers, supervised fits, pre-stages, pre-training,
resume, DDP and the run folder."""

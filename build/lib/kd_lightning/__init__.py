"""kd_lightning: knowledge transfer from a frozen teacher ensemble to a student."""

__version__ = "0.1.0"

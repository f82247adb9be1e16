"""Teachers: the frozen ensemble, its members fitted once and cached, the teacher-output stores and the
precompute callback that fills them."""

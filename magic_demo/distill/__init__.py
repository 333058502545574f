"""The paper's distillation recipes on the miniature teacher: CFG distillation (`cfg.py`) and DMD2 step
distillation (`dmd2.py`)."""

"""Knowledge distillation: the stage (``stage.py``), its teacher (``teacher.py``) and on-policy answers
(``on_policy.py``)."""

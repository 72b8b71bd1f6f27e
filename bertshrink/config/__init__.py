"""Typed, range-checked configuration: every knob declared once (``knobs``), the recipe steps
(``recipes``), the ``params.yaml`` sections (``params``) and where artifacts live (``artifacts``)."""

"""MLflow, outside the library: tracking runs (``runs``), logging and tagging registered versions
(``registry``), the pyfunc model that serves restructured folders (``pyfunc_model``), and loading a
registered model as a server would (``serving``). ``bertshrink/`` imports none of this."""

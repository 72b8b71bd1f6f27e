"""Selection: the collapse rule, the promotion rule, and the Pareto report."""

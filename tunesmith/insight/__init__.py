"""Understanding runs: the HTML report (report), attributions (explain), per-slice metrics (fairness) and the
TensorBoard / MLflow mirrors (tracking)."""

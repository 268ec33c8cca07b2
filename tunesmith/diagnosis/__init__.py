"""The data doctor: row checks with file:line (checks), label-noise candidates (noise), the whole diagnosis of a
recipe's data (diagnose) and its text report (report). `ts.doctor` and `tunesmith doctor` call diagnose."""

"""The paper report (report.py): claims and verdicts, statistics, collection, rendering, figures, the paper's own
values, the preconditions, and the lr x epochs grid."""
